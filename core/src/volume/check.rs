//! `freezeframe volume check`: what of a volume's state is damaged, and —
//! only when the operator asks (`repair`) — recovery of what can be recovered.
//!
//! It works without [`super::Volume::open`] (which refuses a damaged
//! catalog) and reads every piece of state on its own:
//!
//! - both catalog slots and the `gen` file: a newest intact slot older than
//!   `gen` means acknowledged catalog changes are damaged;
//! - every snapshot's map: header, and every record (a damaged record makes
//!   the snapshot Invalid);
//! - every diff-area slot the maps reference, against the record's checksum;
//! - map files the catalog does not know.
//!
//! Repair never guesses silently; every action is listed in the report:
//! the older catalog slot is accepted (written as a new generation above
//! `gen`), snapshots whose state after that generation is unknown (Open
//! ones) or whose map or data is damaged become Invalid with the reason,
//! maps of snapshots the surviving catalog does not know come back as
//! Invalid snapshots (so their space can be reclaimed with delete), ids are
//! never reused, and leftover map files of aborted attempts are removed. It
//! holds the gate exclusively (no write of any process is in progress) and
//! the catalog lock.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

use super::catalog::{self, Catalog, SnapshotRecord};
use super::locks::Locks;
use super::map::{self, data_sum, Invalidity};
use super::{location, map_files, map_path, SnapshotId, SnapshotState};

/// One catalog slot as `check` found it.
#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    pub file: PathBuf,
    pub generation: Option<u64>,
    /// Why it is unusable (None when intact).
    pub problem: Option<String>,
}

/// One snapshot (or stray map file) as `check` found it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub id: SnapshotId,
    /// As the catalog in use says (None for a map the catalog does not know).
    pub state: Option<String>,
    pub map: PathBuf,
    /// Intact records read from the map.
    pub records: u64,
    /// Blocks the snapshot holds in the diff area.
    pub blocks: u64,
    /// Diff-area slots checked against their record's checksum.
    pub slots_checked: u64,
    /// What is damaged (empty when nothing is).
    pub problems: Vec<String>,
}

/// Everything `check` found, and what `repair` did.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub volume: PathBuf,
    pub state_dir: PathBuf,
    pub slots: Vec<SlotReport>,
    /// The generation the `gen` file records.
    pub recorded_generation: u64,
    /// The catalog generation in use (after repair: the one written).
    pub catalog_generation: Option<u64>,
    pub snapshots: Vec<SnapshotReport>,
    /// Every problem, one line each (empty: the state is intact).
    pub problems: Vec<String>,
    /// What repair did (empty without `--repair`).
    pub repaired: Vec<String>,
    /// Problems repair could not fix, or that need `--repair`.
    pub unresolved: Vec<String>,
}

impl CheckReport {
    /// True when nothing is damaged (or everything damaged was repaired).
    pub fn is_clean(&self) -> bool {
        self.unresolved.is_empty()
    }
}

/// Checks the state of `volume`; with `repair`, recovers what can be recovered.
pub fn check(volume: &Path, repair: bool) -> Result<CheckReport> {
    let state_dir = location::find(volume)?;
    let locks = Locks::new(&state_dir);
    let _gate = if repair {
        Some(locks.gate_exclusive()?)
    } else {
        None
    };
    let _cat_lock = locks.catalog()?;
    let mut report = CheckReport {
        volume: volume.to_path_buf(),
        state_dir: state_dir.clone(),
        slots: Vec::new(),
        recorded_generation: catalog::recorded_gen(&state_dir)?,
        catalog_generation: None,
        snapshots: Vec::new(),
        problems: Vec::new(),
        repaired: Vec::new(),
        unresolved: Vec::new(),
    };
    let recorded = report.recorded_generation;

    // --- catalog slots and gen ---
    let mut best: Option<Catalog> = None;
    for (file, r) in catalog::load_slots(&state_dir) {
        match r {
            Ok(c) => {
                report.slots.push(SlotReport {
                    file,
                    generation: Some(c.generation),
                    problem: None,
                });
                if best.as_ref().is_none_or(|b| c.generation > b.generation) {
                    best = Some(c);
                }
            }
            Err(e) => {
                let missing = matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
                let problem = if missing {
                    "not written yet".to_string()
                } else {
                    e.to_string()
                };
                report.slots.push(SlotReport {
                    file,
                    generation: None,
                    problem: Some(problem),
                });
            }
        }
    }
    let Some(mut cat) = best else {
        let line = "neither catalog slot is intact: the volume's identity and snapshot list are lost; nothing can be recovered from the catalog".to_string();
        report.problems.push(line.clone());
        report.unresolved.push(line);
        return Ok(report);
    };
    let mut rolled_back = None;
    if cat.generation < recorded {
        let line = format!(
            "the newest intact catalog slot holds generation {} but gen records {recorded}: the catalog changes of generations {}..={recorded} are lost (snapshots created, sealed, deleted or invalidated in them)",
            cat.generation,
            cat.generation + 1
        );
        report.problems.push(line.clone());
        rolled_back = Some(line);
    } else {
        // A torn slot one generation ahead of gen is an unacknowledged change, not damage.
        for s in &report.slots {
            if let (Some(p), None) = (&s.problem, s.generation) {
                if p != "not written yet" {
                    tracing::info!(
                        "{}: {p} (an unacknowledged change torn by a crash; harmless)",
                        s.file.display()
                    );
                }
            }
        }
    }
    let gen_path = state_dir.join("gen");
    let gen_len = std::fs::metadata(&gen_path).map(|m| m.len()).unwrap_or(0);
    let gen_short = gen_len < 9;
    if gen_short {
        report.problems.push(format!(
            "{} is {gen_len} bytes, expected 9",
            gen_path.display()
        ));
    }

    // --- maps ---
    let mut invalidate: BTreeMap<SnapshotId, String> = BTreeMap::new();
    let files: BTreeMap<SnapshotId, PathBuf> = map_files(&state_dir)?.into_iter().collect();
    let diff_path = state_dir.join("diff.dat");
    let diff = File::open(&diff_path).map_err(|e| Error::io("open", &diff_path, e))?;
    let bs = cat.block_size as u64;
    for rec in &cat.snapshots {
        let path = map_path(&state_dir, rec.id);
        let mut sr = SnapshotReport {
            id: rec.id,
            state: Some(rec.state.to_string()),
            map: path.clone(),
            records: 0,
            blocks: 0,
            slots_checked: 0,
            problems: Vec::new(),
        };
        let invalid_already = matches!(rec.state, SnapshotState::Invalid { .. });
        if rolled_back.is_some() && rec.state == SnapshotState::Open && !invalid_already {
            invalidate.insert(
                rec.id,
                format!(
                    "the catalog was rolled back from generation {recorded} to {} by `volume check --repair`: whether this snapshot was sealed or written after it is unknown",
                    cat.generation
                ),
            );
        }
        match map::check(&path, &cat.uuid, rec.id, cat.block_size, &locks) {
            Err(e) => {
                let line = format!("snapshot {}: {e}", rec.id);
                sr.problems.push(line.clone());
                if !invalid_already {
                    report.problems.push(line);
                    invalidate.insert(rec.id, format!("its map is unusable: {e}"));
                }
            }
            Ok(m) => {
                sr.records = m.records;
                sr.blocks = m.entries.len() as u64;
                if let Some(Invalidity::Damaged(why)) = &m.invalid {
                    sr.problems.push(why.clone());
                    if !invalid_already {
                        report.problems.push(format!("snapshot {}: {why}", rec.id));
                        invalidate.insert(rec.id, why.clone());
                    }
                }
                if m.invalid.is_none() && !invalid_already {
                    let mut buf = vec![0u8; bs as usize];
                    for (block, e) in &m.entries {
                        sr.slots_checked += 1;
                        let ok = diff.read_exact_at(&mut buf, e.slot * bs).is_ok()
                            && data_sum(&buf) == e.data_sum;
                        if !ok {
                            let why = format!(
                                "the diff-area copy of block {block} (slot {} of {}) fails its checksum",
                                e.slot,
                                diff_path.display()
                            );
                            sr.problems.push(why.clone());
                            report.problems.push(format!("snapshot {}: {why}", rec.id));
                            invalidate.entry(rec.id).or_insert(why);
                        }
                    }
                }
            }
        }
        report.snapshots.push(sr);
    }

    // --- map files the catalog does not know ---
    let mut strays: Vec<(SnapshotId, PathBuf, bool)> = Vec::new();
    for (id, path) in &files {
        if cat.get(*id).is_some() {
            continue;
        }
        let records = map::check(path, &cat.uuid, *id, cat.block_size, &locks)
            .map(|m| m.records)
            .unwrap_or(0);
        // Below next_id with no records: an aborted attempt or interrupted delete.
        // Anything else is a snapshot the surviving catalog forgot.
        let forgotten = *id >= cat.next_id || (records > 0 && rolled_back.is_some());
        let line = if forgotten {
            format!(
                "map {} (snapshot {id}) is not in the catalog: a snapshot whose catalog record was lost",
                path.display()
            )
        } else {
            format!(
                "map {} (snapshot {id}) is left over from an aborted snapshot attempt or delete",
                path.display()
            )
        };
        report.problems.push(line);
        report.snapshots.push(SnapshotReport {
            id: *id,
            state: None,
            map: path.clone(),
            records,
            blocks: 0,
            slots_checked: 0,
            problems: vec![if forgotten {
                "not in the catalog".into()
            } else {
                "leftover".into()
            }],
        });
        strays.push((*id, path.clone(), forgotten));
    }

    report.catalog_generation = Some(cat.generation);
    if !repair {
        report.unresolved = report.problems.clone();
        return Ok(report);
    }

    // --- repair ---
    let before = cat.generation;
    let mut changed = rolled_back.is_some();
    if rolled_back.is_some() {
        report.repaired.push(format!(
            "accepted catalog generation {before}; changes of generations {}..={recorded} are lost",
            before + 1
        ));
    }
    for (id, reason) in &invalidate {
        if let Some(r) = cat.get_mut(*id) {
            r.state = SnapshotState::Invalid {
                reason: reason.clone(),
            };
            report
                .repaired
                .push(format!("snapshot {id} marked INVALID: {reason}"));
            changed = true;
        }
    }
    for (id, path, forgotten) in &strays {
        if *forgotten {
            let created_ms = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            cat.snapshots.push(SnapshotRecord {
                id: *id,
                created_ms,
                state: SnapshotState::Invalid {
                    reason: format!("its catalog record was lost (catalog rolled back to generation {before}); delete it to reclaim its space"),
                },
                diff_limit: None,
            });
            cat.snapshots.sort_by_key(|s| s.id);
            cat.next_id = cat.next_id.max(id + 1);
            cat.last_created = cat.last_created.max(*id);
            report.repaired.push(format!(
                "snapshot {id} restored to the catalog as INVALID so its space can be reclaimed with delete"
            ));
            changed = true;
        } else {
            std::fs::remove_file(path).map_err(|e| Error::io("remove", path, e))?;
            report.repaired.push(format!("removed {}", path.display()));
        }
    }
    if changed || gen_short {
        cat.generation = cat.generation.max(recorded).saturating_add(1);
        catalog::store(&state_dir, &cat)?;
        let gen = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&gen_path)
            .map_err(|e| Error::io("open", &gen_path, e))?;
        catalog::write_gen(&gen, &gen_path, cat.generation)?;
        // Flush the volume at the next create: whether a write is unflushed is unknown.
        catalog::write_dirty(&gen, &gen_path, true)?;
        gen.sync_data()
            .map_err(|e| Error::io("fdatasync", &gen_path, e))?;
        report.repaired.push(format!(
            "wrote catalog generation {} and recorded it in gen",
            cat.generation
        ));
        report.catalog_generation = Some(cat.generation);
    }
    Ok(report)
}
