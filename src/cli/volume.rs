//! `freezeframe volume …`: create, write, snapshot, list, read, delete and
//! diff a shared volume through the copy-on-write engine. Every command finds
//! the volume's state directory by itself, so it is safe on a volume a
//! running cluster also writes.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use freezeframe_core::units::{format_size, parse_block_size, parse_size};
use freezeframe_core::volume::{SnapshotOptions, Volume};

/// Flags of `freezeframe volume`.
#[derive(Args, Debug)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume (or adopt an existing file or device) and its state directory.
    Create {
        path: PathBuf,
        /// Volume size, e.g. 1GiB.
        #[arg(long)]
        size: String,
        /// Block size, a power of two from 4KiB to 1MiB.
        #[arg(long, default_value = "64KiB")]
        block_size: String,
        /// State directory on the shared storage (default: PATH.ffstate beside the volume).
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Write stdin to the live volume at --offset, through the engine.
    Write {
        path: PathBuf,
        /// Byte offset (sizes like 64KiB allowed).
        #[arg(long, default_value = "0")]
        offset: String,
    },
    /// Take a local, crash-consistent snapshot now (created and sealed); prints its id.
    Snapshot {
        path: PathBuf,
        /// Diff-area limit, e.g. 10GiB; past it the snapshot becomes invalid.
        #[arg(long)]
        diff_limit: Option<String>,
    },
    /// List the snapshots.
    Snapshots {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write a raw image of a snapshot (or of the live volume) to stdout.
    Read {
        path: PathBuf,
        #[arg(long, conflicts_with = "live", required_unless_present = "live")]
        snapshot: Option<u64>,
        #[arg(long)]
        live: bool,
    },
    /// Explain what of the volume's state is damaged (catalog slots, gen, every
    /// snapshot map, the diff-area copies they reference); exits non-zero when
    /// anything is. Nothing is changed without --repair.
    Check {
        path: PathBuf,
        /// Recover what can be recovered, saying exactly what is lost: accept an
        /// older catalog slot, mark damaged snapshots INVALID, remove leftovers.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show or set the volume-wide cap on the diff area (bytes on disk). Past
    /// it the oldest snapshot is dropped (INVALID), never a live write.
    DiffMax {
        path: PathBuf,
        /// A size such as 10GiB, or `none` to remove the cap; omit to show it.
        value: Option<String>,
    },
    /// Delete a snapshot and reclaim its diff-area space.
    Delete {
        path: PathBuf,
        #[arg(long)]
        snapshot: u64,
    },
    /// Blocks that may differ between two snapshots, or a snapshot and the live volume.
    Changed {
        path: PathBuf,
        #[arg(long)]
        from: u64,
        /// A snapshot id, or `live`.
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
}

/// Runs one `volume` subcommand.
pub fn run(args: VolumeArgs) -> anyhow::Result<()> {
    match args.command {
        VolumeCommand::Create {
            path,
            size,
            block_size,
            state,
        } => {
            let size = parse_size(&size)?;
            let bs = parse_block_size(&block_size)?;
            let v = Volume::create(&path, size, bs, state.as_deref())?;
            println!(
                "created {} ({}, blocks of {}), state in {}",
                path.display(),
                format_size(size),
                format_size(bs as u64),
                v.state_dir().display()
            );
        }
        VolumeCommand::Write { path, offset } => {
            let v = Volume::open(&path)?;
            let mut at = parse_size(&offset)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut stdin = std::io::stdin().lock();
            loop {
                let n = read_full(&mut stdin, &mut buf).context("reading stdin")?;
                if n == 0 {
                    break;
                }
                v.write_at(&buf[..n], at)?;
                at += n as u64;
            }
            v.flush()?;
        }
        VolumeCommand::Snapshot { path, diff_limit } => {
            let v = Volume::open(&path)?;
            let diff_limit = diff_limit.as_deref().map(parse_size).transpose()?;
            let Some(_in_flight) = v.try_begin_snapshot()? else {
                bail!("volume {} is busy: another snapshot request is in flight; retry when it completes", path.display());
            };
            let id = v.reserve_snapshot_id()?;
            v.create_snapshot(id, &SnapshotOptions { diff_limit })?;
            v.seal_snapshot(id)?;
            println!("{id}");
        }
        VolumeCommand::Snapshots { path, json } => {
            let v = Volume::open(&path)?;
            let list = v.snapshots()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:>6}  {:<14}  {:>10}  {:>10}  {:>10}  STATE",
                    "ID", "CREATED (ms)", "DIFF", "BLOCKS", "LIMIT"
                );
                for s in list {
                    let limit = s.diff_limit.map(format_size).unwrap_or_else(|| "-".into());
                    println!(
                        "{:>6}  {:<14}  {:>10}  {:>10}  {:>10}  {}",
                        s.id,
                        s.created_ms,
                        format_size(s.diff_bytes),
                        s.diff_blocks,
                        limit,
                        s.state
                    );
                }
            }
        }
        VolumeCommand::Read {
            path,
            snapshot,
            live,
        } => {
            let v = Volume::open(&path)?;
            let snap = if live {
                None
            } else {
                snapshot.map(|id| v.snapshot(id)).transpose()?
            };
            let mut out = std::io::stdout().lock();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < v.size() {
                let n = match &snap {
                    Some(s) => s.read_at(&mut buf, at)?,
                    None => v.read_at(&mut buf, at)?,
                };
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n]).context("writing stdout")?;
                at += n as u64;
            }
            out.flush().context("writing stdout")?;
        }
        VolumeCommand::Check { path, repair, json } => {
            let report = freezeframe_core::volume::check(&path, repair)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_check(&report);
            }
            if !report.is_clean() {
                bail!(
                    "{} problem(s) in the state of {}{}",
                    report.unresolved.len(),
                    path.display(),
                    if repair {
                        " could not be repaired"
                    } else {
                        "; run `freezeframe volume check PATH --repair` to recover what can be recovered"
                    }
                );
            }
        }
        VolumeCommand::DiffMax { path, value } => {
            let v = Volume::open(&path)?;
            match value.as_deref() {
                None => {}
                Some("none") => v.set_diff_max(None)?,
                Some(size) => v.set_diff_max(Some(parse_size(size)?))?,
            }
            match v.diff_max()? {
                Some(max) => println!("diff_max {}", format_size(max)),
                None => println!("diff_max none"),
            }
        }
        VolumeCommand::Delete { path, snapshot } => {
            Volume::open(&path)?.delete_snapshot(snapshot)?;
        }
        VolumeCommand::Changed {
            path,
            from,
            to,
            json,
        } => {
            let v = Volume::open(&path)?;
            let to_id = match to.as_str() {
                "live" => None,
                s => Some(
                    s.parse::<u64>()
                        .with_context(|| format!("--to {s:?}: expected a snapshot id or `live`"))?,
                ),
            };
            let blocks = v.changed_blocks(from, to_id)?;
            if json {
                let doc = serde_json::json!({ "from": from, "to": to, "block_size": v.block_size(), "blocks": blocks });
                println!("{doc}");
            } else {
                for b in blocks {
                    println!("{b}");
                }
            }
        }
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn print_check(r: &freezeframe_core::volume::CheckReport) {
    println!(
        "volume {} (state in {})",
        r.volume.display(),
        r.state_dir.display()
    );
    for s in &r.slots {
        match (&s.generation, &s.problem) {
            (Some(g), _) => println!("  {}: generation {g}, intact", s.file.display()),
            (None, Some(p)) => println!("  {}: {p}", s.file.display()),
            (None, None) => println!("  {}: ?", s.file.display()),
        }
    }
    println!("  gen records generation {}", r.recorded_generation);
    for s in &r.snapshots {
        let state = s.state.as_deref().unwrap_or("not in the catalog");
        let verdict = if s.problems.is_empty() {
            "ok".to_string()
        } else {
            s.problems.join("; ")
        };
        println!(
            "  snapshot {} ({state}): {} records, {} blocks, {} diff-area copies checked: {verdict}",
            s.id, s.records, s.blocks, s.slots_checked
        );
    }
    if r.problems.is_empty() {
        println!("no damage found");
    }
    for p in &r.problems {
        println!("DAMAGED: {p}");
    }
    for p in &r.repaired {
        println!("REPAIRED: {p}");
    }
}
