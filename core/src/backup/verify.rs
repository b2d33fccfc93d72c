//! Checking a repository: structure always, and with `read_data` every
//! byte of every pack against its blake3 hash.
//!
//! A problem is reported with the file it is in and, for damaged block
//! data, every backup and block that uses it, so an operator knows which
//! restores would fail.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde::Serialize;

use super::fsutil::{list_files, list_temps};
use super::hash::{BlockHash, DigestBuild};
use super::index::MasterIndex;
use super::pack::read_trailer;
use super::repo::Repository;
use super::Progress;
use crate::error::Result;

const READ_BYTES: u64 = 8 << 20;
/// Block numbers listed per backup in one problem (the count is always given).
const BLOCKS_SHOWN: usize = 8;

/// One thing wrong with a repository.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyProblem {
    /// The file the problem is in (pack, index or manifest).
    pub path: PathBuf,
    /// Backups that cannot be fully restored because of it.
    pub backups: Vec<String>,
    /// For damaged or missing block data: (backup, block indices) affected.
    pub blocks: Vec<(String, Vec<u64>)>,
    pub message: String,
}

/// The outcome of `verify`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backups: u64,
    pub packs: u64,
    pub blobs_checked: u64,
    pub bytes_read: u64,
    pub read_data: bool,
    pub problems: Vec<VerifyProblem>,
    /// Harmless findings (unreferenced packs, leftover temporaries) that gc cleans up.
    pub notes: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Repository {
    /// Checks the repository. Problems are returned in the report, not as `Err`;
    /// `Err` means verify itself could not run.
    pub fn verify(&self, read_data: bool, progress: &dyn Progress) -> Result<VerifyReport> {
        let mut report = VerifyReport {
            read_data,
            ..Default::default()
        };
        let index = MasterIndex::load(&self.root)?;
        for p in &index.problems {
            report.problems.push(VerifyProblem {
                path: p.path.clone(),
                backups: vec![],
                blocks: vec![],
                message: p.message.clone(),
            });
        }
        let (manifests, unreadable) = self.manifests()?;
        report.backups = manifests.len() as u64;
        for (path, message) in unreadable {
            report.problems.push(VerifyProblem {
                path,
                backups: vec![],
                blocks: vec![],
                message,
            });
        }

        // Which backups use which hash, for naming the victims of damaged data.
        let mut users: HashMap<BlockHash, Vec<(u32, u64)>, DigestBuild> = HashMap::default();
        for (mi, m) in manifests.iter().enumerate() {
            let mut missing: Vec<u64> = Vec::new();
            for (i, b) in m.blocks.iter().enumerate() {
                if let Some(h) = b {
                    if index.get(h).is_none() {
                        missing.push(i as u64);
                    } else {
                        users.entry(*h).or_default().push((mi as u32, i as u64));
                    }
                }
            }
            if !missing.is_empty() {
                let n = missing.len();
                missing.truncate(BLOCKS_SHOWN);
                report.problems.push(VerifyProblem {
                    path: self.manifest_path(&m.header.id),
                    backups: vec![m.header.id.clone()],
                    message: format!(
                        "backup {}: {n} block(s) are in no pack of the index (first: {:?})",
                        m.header.id, missing
                    ),
                    blocks: vec![(m.header.id.clone(), missing)],
                });
            }
        }

        // Packs: trailer against index, and with read_data every blob.
        let indexed: std::collections::HashSet<String> =
            index.packs.iter().map(|p| p.id.clone()).collect();
        for name in list_files(&self.root.join("packs"), ".pack")? {
            let id = name.trim_end_matches(".pack");
            if !indexed.contains(id)
                && !index
                    .problems
                    .iter()
                    .any(|p| p.path.ends_with(format!("{id}.idx")))
            {
                report.notes.push(format!("pack packs/{name} is in no index (left by an interrupted backup; gc removes it)"));
            }
        }
        for sub in ["packs", "index", "backups"] {
            for t in list_temps(&self.root.join(sub))? {
                report.notes.push(format!(
                    "leftover temporary {} (gc removes it)",
                    t.display()
                ));
            }
        }
        if read_data {
            progress.start("verify", index.packs.iter().map(|p| p.size).sum());
        }
        for pack in &index.packs {
            report.packs += 1;
            match read_trailer(&pack.path) {
                Ok(mut trailer) => {
                    let mut listed = pack.entries.clone();
                    trailer.sort_by_key(|e| e.offset);
                    listed.sort_by_key(|e| e.offset);
                    if trailer != listed {
                        report.problems.push(VerifyProblem {
                            path: pack.path.clone(),
                            backups: vec![],
                            blocks: vec![],
                            message: format!(
                                "pack trailer and index {} disagree on its contents",
                                pack.index_path.display()
                            ),
                        });
                    }
                }
                Err(e) => report.problems.push(VerifyProblem {
                    path: pack.path.clone(),
                    backups: vec![],
                    blocks: vec![],
                    message: e.to_string(),
                }),
            }
            if !read_data {
                continue;
            }
            let mut entries = pack.entries.clone();
            entries.sort_by_key(|e| e.offset);
            let file = match File::open(&pack.path) {
                Ok(f) => f,
                Err(e) => {
                    report.problems.push(VerifyProblem {
                        path: pack.path.clone(),
                        backups: vec![],
                        blocks: vec![],
                        message: format!("cannot open: {e}"),
                    });
                    continue;
                }
            };
            let mut buf = Vec::new();
            let mut i = 0;
            while i < entries.len() {
                let start = entries[i].offset;
                let mut end = start;
                let mut j = i;
                while j < entries.len() && entries[j].offset <= end && end - start < READ_BYTES {
                    end = end.max(entries[j].offset + u64::from(entries[j].len));
                    j += 1;
                }
                buf.resize((end - start) as usize, 0);
                let read = file.read_exact_at(&mut buf, start);
                report.bytes_read += end - start;
                progress.advance(end - start);
                for e in &entries[i..j] {
                    report.blobs_checked += 1;
                    let detail = match &read {
                        Err(err) => format!("cannot read: {err}"),
                        Ok(()) => {
                            let data = &buf[(e.offset - start) as usize
                                ..(e.offset - start) as usize + e.len as usize];
                            let got = BlockHash::of(data);
                            if got == e.hash {
                                continue;
                            }
                            format!("hashes to {got}")
                        }
                    };
                    report.problems.push(damaged(
                        &manifests, &users, &pack.path, e.hash, e.offset, e.len, detail,
                    ));
                }
                i = j;
            }
        }
        if read_data {
            progress.finish();
        }
        Ok(report)
    }
}

/// A problem for a damaged blob, naming every backup and block that uses it.
fn damaged(
    manifests: &[super::manifest::Manifest],
    users: &HashMap<BlockHash, Vec<(u32, u64)>, DigestBuild>,
    pack: &std::path::Path,
    hash: BlockHash,
    offset: u64,
    len: u32,
    detail: String,
) -> VerifyProblem {
    let mut per_backup: Vec<(String, Vec<u64>)> = Vec::new();
    for &(mi, block) in users.get(&hash).map(|v| v.as_slice()).unwrap_or(&[]) {
        let id = &manifests[mi as usize].header.id;
        match per_backup.iter_mut().find(|(b, _)| b == id) {
            Some((_, blocks)) => blocks.push(block),
            None => per_backup.push((id.clone(), vec![block])),
        }
    }
    let users_text = if per_backup.is_empty() {
        "no backup uses it".to_string()
    } else {
        per_backup
            .iter()
            .map(|(b, blocks)| {
                let shown: Vec<u64> = blocks.iter().take(BLOCKS_SHOWN).copied().collect();
                format!(
                    "backup {b} block(s) {shown:?}{}",
                    if blocks.len() > BLOCKS_SHOWN {
                        " …"
                    } else {
                        ""
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    VerifyProblem {
        path: pack.to_path_buf(),
        backups: per_backup.iter().map(|(b, _)| b.clone()).collect(),
        message: format!(
            "pack {}: blob at offset {offset} ({len} bytes, blake3 {hash}) is corrupt: {detail}; used by {users_text}",
            pack.display()
        ),
        blocks: per_backup,
    }
}
