//! `freezeframe backup …`: the backup repository from the command line
//! (init, run, list, restore, verify, forget, gc). Flags are parsed here and
//! everything else is `freezeframe_core::backup`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use freezeframe_core::backup::{
    BackupKind, ManifestHeader, Progress, Repository, VolumeSnapshotSource,
};
use freezeframe_core::volume::Volume;

/// `freezeframe backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: BackupCommand,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Create a backup repository in a directory (local, or a mounted network share).
    Init {
        repo: PathBuf,
        /// Target size of pack files.
        #[arg(long, default_value = "32MiB")]
        pack_size: String,
        /// Print one JSON value instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Back up a complete snapshot of this node's volume: full the first time,
    /// then only the blocks changed since the last backed-up snapshot.
    Run {
        #[arg(long)]
        repo: PathBuf,
        /// The volume (image file or block device); default: the node config's volume.
        #[arg(long)]
        volume: Option<PathBuf>,
        /// Snapshot id, or `latest` (the newest sealed snapshot).
        #[arg(long, default_value = "latest")]
        snapshot: String,
        /// Print one JSON value instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The backups in a repository, oldest first.
    List {
        #[arg(long)]
        repo: PathBuf,
        /// Print one JSON value instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup, bit-exact, to an image file (created or overwritten) or a block device.
    /// A freezeframe volume is refused unless --through-engine is given.
    Restore {
        #[arg(long)]
        repo: PathBuf,
        /// Backup id or a unique prefix of it.
        backup_id: String,
        #[arg(long)]
        to: PathBuf,
        /// TO is a freezeframe volume: write through its engine (only blocks that differ,
        /// each copied to the snapshots first), so every existing snapshot keeps its content.
        #[arg(long)]
        through_engine: bool,
        /// Print one JSON value instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the repository; with --read-data also every byte of every pack.
    Verify {
        #[arg(long)]
        repo: PathBuf,
        #[arg(long)]
        read_data: bool,
        /// Print one JSON value instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a backup and collect the data no other backup uses.
    Forget {
        #[arg(long)]
        repo: PathBuf,
        backup_id: String,
        /// Print one JSON value instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Collect unreferenced data and debris of interrupted backups.
    Gc {
        #[arg(long)]
        repo: PathBuf,
        /// Print one JSON value instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one backup command. `config` is the node config selected with `--config`.
pub fn run(args: BackupArgs, config: Option<&Path>) -> Result<ExitCode> {
    match args.command {
        BackupCommand::Init {
            repo,
            pack_size,
            json,
        } => {
            let pack_size =
                freezeframe_core::units::parse_size(&pack_size).context("--pack-size")?;
            let r = Repository::init(&repo, pack_size)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "repo": repo, "config": r.config() })
                );
            } else {
                println!(
                    "backup repository {} created in {}",
                    r.config().repo_id,
                    repo.display()
                );
            }
        }
        BackupCommand::Run {
            repo,
            volume,
            snapshot,
            json,
        } => {
            let volume_path = match (volume, config) {
                (Some(v), _) => v,
                (None, Some(cfg)) => crate::config::NodeConfig::load(cfg)?.raw.volume.path,
                (None, None) => {
                    bail!("no volume selected: pass --volume PATH or --config node.toml")
                }
            };
            let id = match snapshot.as_str() {
                "latest" => None,
                s => Some(s.parse::<u64>().with_context(|| {
                    format!("--snapshot {s:?}: expected a snapshot id or `latest`")
                })?),
            };
            let repo = Repository::open(&repo)?;
            let vol = Volume::open(&volume_path)?;
            let source = VolumeSnapshotSource::new(&vol, id)?;
            let bar = Bar::new(json);
            let m = repo.backup(&source, &bar)?;
            drop(bar);
            if json {
                println!("{}", serde_json::to_string(&m.header)?);
            } else {
                print_run(&m.header);
            }
        }
        BackupCommand::List { repo, json } => {
            let listing = Repository::open(&repo)?.list()?;
            if json {
                let unreadable: Vec<_> = listing
                    .unreadable
                    .iter()
                    .map(|(p, e)| serde_json::json!({ "path": p, "error": e }))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "backups": listing.backups, "unreadable": unreadable })
                );
            } else {
                println!(
                    "{:<16}  {:<20}  {:>8}  {:<11}  {:>10}  {:>10}  volume",
                    "id", "created (UTC)", "snapshot", "kind", "size", "stored"
                );
                for h in &listing.backups {
                    println!(
                        "{:<16}  {:<20}  {:>8}  {:<11}  {:>10}  {:>10}  {}",
                        h.id,
                        utc(h.created_ms),
                        h.snapshot.id,
                        match h.kind {
                            BackupKind::Full { .. } => "full",
                            BackupKind::Incremental { .. } => "incremental",
                        },
                        crate::human_bytes(h.image_size),
                        crate::human_bytes(h.stats.bytes_stored),
                        h.source.name
                    );
                }
                for (p, e) in &listing.unreadable {
                    println!("unreadable manifest {}: {e}", p.display());
                }
            }
        }
        BackupCommand::Restore {
            repo,
            backup_id,
            to,
            through_engine,
            json,
        } => {
            let repo = Repository::open(&repo)?;
            let bar = Bar::new(json);
            let r = if through_engine {
                let volume = freezeframe_core::volume::Volume::open(&to)?;
                repo.restore_through_engine(&backup_id, &volume, &bar)?
            } else {
                repo.restore(&backup_id, &to, &bar)?
            };
            drop(bar);
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else if through_engine {
                println!(
                    "restored backup {} through the engine of {} ({}, {} blocks differed and were written) in {:.2} s",
                    r.backup_id,
                    to.display(),
                    crate::human_bytes(r.image_size),
                    r.blocks_written,
                    r.duration_ms as f64 / 1000.0
                );
            } else {
                println!(
                    "restored backup {} to {} ({}, {} zero blocks skipped) in {:.2} s",
                    r.backup_id,
                    to.display(),
                    crate::human_bytes(r.image_size),
                    r.blocks_zero,
                    r.duration_ms as f64 / 1000.0
                );
            }
        }
        BackupCommand::Verify {
            repo,
            read_data,
            json,
        } => {
            let repo = Repository::open(&repo)?;
            let bar = Bar::new(json);
            let r = repo.verify(read_data, &bar)?;
            drop(bar);
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                for p in &r.problems {
                    println!("PROBLEM {}: {}", p.path.display(), p.message);
                }
                for n in &r.notes {
                    println!("note: {n}");
                }
                println!(
                    "{} backups, {} packs{}: {}",
                    r.backups,
                    r.packs,
                    if read_data {
                        format!(", {} blocks read and hashed", r.blobs_checked)
                    } else {
                        String::new()
                    },
                    if r.is_clean() {
                        "no problems".to_string()
                    } else {
                        format!("{} problem(s)", r.problems.len())
                    }
                );
            }
            if !r.is_clean() {
                return Ok(ExitCode::FAILURE);
            }
        }
        BackupCommand::Forget {
            repo,
            backup_id,
            json,
        } => {
            let r = Repository::open(&repo)?.forget(&backup_id)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "forgot backup {}; gc deleted {} pack(s), rewrote {}, freed {}",
                    r.forgotten.as_deref().unwrap_or("?"),
                    r.packs_deleted + r.orphan_packs_removed,
                    r.packs_rewritten,
                    crate::human_bytes(r.bytes_freed)
                );
            }
        }
        BackupCommand::Gc { repo, json } => {
            let r = Repository::open(&repo)?.gc()?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "gc deleted {} pack(s), rewrote {}, removed {} temporaries, freed {}",
                    r.packs_deleted + r.orphan_packs_removed,
                    r.packs_rewritten,
                    r.temps_removed,
                    crate::human_bytes(r.bytes_freed)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_run(h: &ManifestHeader) {
    let how = match &h.kind {
        BackupKind::Full { reason: None } => "full".to_string(),
        BackupKind::Full { reason: Some(r) } => format!("full ({r})"),
        BackupKind::Incremental {
            parent,
            parent_snapshot,
        } => {
            format!("express-full on backup {parent} (snapshot {parent_snapshot})")
        }
    };
    let s = &h.stats;
    println!(
        "backup {} of {} snapshot {}: {how}",
        h.id, h.source.name, h.snapshot.id
    );
    println!(
        "  read {} blocks ({}) of {}, stored {} new ({}), {} zero blocks, {} pack(s), {:.2} s",
        s.blocks_read,
        crate::human_bytes(s.bytes_read),
        s.blocks_total,
        s.blocks_stored,
        crate::human_bytes(s.bytes_stored),
        s.blocks_zero,
        s.packs_written,
        s.duration_ms as f64 / 1000.0
    );
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) from Unix milliseconds.
fn utc(ms: u64) -> String {
    freezeframe_core::units::utc_seconds(ms)
}

/// A progress bar on stderr, only on a terminal and never with --json.
pub struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    pub fn new(json: bool) -> Bar {
        if json || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        Bar(Some(indicatif::ProgressBar::hidden()))
    }
}

impl Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        if let Some(b) = &self.0 {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.set_length(total);
            b.set_position(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(phase.to_string());
        }
    }
    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_000_000_000), "2026-11-18 11:06:40");
    }
}
