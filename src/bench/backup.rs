//! `freezeframe bench backup`: our full and express-full backups against
//! restic and borg, in one run on the same volume.
//!
//! A volume of random (incompressible) data is created with the volume
//! engine and snapshotted; each tool backs it up (ours from the snapshot,
//! restic and borg from the image file, which holds the same bytes). Then a
//! share of the blocks is rewritten through the engine (copy-on-write into
//! the diff area), a second snapshot is taken, and each tool backs up
//! again: ours reads only the changed blocks the diff area lists, the others
//! read the whole file. Printed: times, repository growth, and ratios.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use freezeframe_core::backup::{NoProgress, Repository, VolumeSnapshotSource, DEFAULT_PACK_SIZE};
use freezeframe_core::volume::{SnapshotOptions, Volume};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

/// Flags of `bench backup`.
#[derive(Args, Debug)]
pub struct BenchBackupArgs {
    /// Volume size.
    #[arg(long, default_value = "1GiB")]
    size: String,
    /// Share of blocks rewritten between the two backups (`1%`, `0.5%`).
    #[arg(long, default_value = "1%")]
    change: String,
    #[arg(long, default_value = "64KiB")]
    block_size: String,
    /// Where the volume and the repositories go (a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keep the volume and repositories afterwards.
    #[arg(long)]
    keep: bool,
    /// Skip restic and borg.
    #[arg(long)]
    only_ours: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Timing and growth of one backup.
struct Step {
    secs: f64,
    growth: u64,
}

pub fn run(args: BenchBackupArgs) -> Result<()> {
    let json_out = args.json;
    let size = freezeframe_core::units::parse_size(&args.size)?;
    let bs = u32::try_from(freezeframe_core::units::parse_size(&args.block_size)?)
        .context("--block-size")?;
    let pct: f64 =
        args.change.trim_end_matches('%').parse().with_context(|| {
            format!("--change {:?}: expected a percentage like 1%", args.change)
        })?;
    if !(0.0..=100.0).contains(&pct) {
        bail!("--change {pct}% is outside 0..100%");
    }
    let work = args
        .dir
        .join(format!("freezeframe-bench-backup-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let result = bench(&work, size, bs, pct, args.only_ours, json_out);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    let report = result?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

fn bench(
    work: &Path,
    size: u64,
    bs: u32,
    pct: f64,
    only_ours: bool,
    json_out: bool,
) -> Result<Value> {
    let say = |msg: &str| {
        if !json_out {
            eprintln!("{msg}");
        }
    };
    let image = work.join("volume.img");
    let vol = Volume::create(&image, size, bs, None)?;
    say(&format!(
        "filling a {} volume with random data",
        crate::human_bytes(size)
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        vol.write_at(&buf[..n], off)?;
        off += n as u64;
    }
    vol.flush()?;
    let snap1 = take_snapshot(&vol)?;

    let ours_repo = work.join("ours");
    let repo = Repository::init(&ours_repo, DEFAULT_PACK_SIZE)?;
    say("ours: full backup");
    let full = timed(&ours_repo, || {
        repo.backup(&VolumeSnapshotSource::new(&vol, Some(snap1))?, &NoProgress)?;
        Ok(())
    })?;

    let restic = if only_ours {
        None
    } else {
        Tool::find("restic")
    };
    let borg = if only_ours { None } else { Tool::find("borg") };
    let mut restic_full = None;
    let mut borg_full = None;
    if let Some(t) = &restic {
        say("restic: full backup");
        restic_full = Some(t.full(work, &image)?);
    }
    if let Some(t) = &borg {
        say("borg: full backup");
        borg_full = Some(t.full(work, &image)?);
    }

    // Rewrite pct% of the blocks through the engine, then snapshot again.
    let blocks = size.div_ceil(u64::from(bs));
    let n_change = ((blocks as f64 * pct / 100.0).ceil() as u64).min(blocks);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < n_change {
        chosen.insert(rng.gen_range(0..blocks));
    }
    let mut block = vec![0u8; bs as usize];
    let mut changed_bytes = 0u64;
    for &b in &chosen {
        let len = (size - b * u64::from(bs)).min(u64::from(bs)) as usize;
        rng.fill_bytes(&mut block[..len]);
        vol.write_at(&block[..len], b * u64::from(bs))?;
        changed_bytes += len as u64;
    }
    vol.flush()?;
    let snap2 = take_snapshot(&vol)?;

    say("ours: express-full backup");
    let mut inc_manifest = None;
    let inc = timed(&ours_repo, || {
        inc_manifest =
            Some(repo.backup(&VolumeSnapshotSource::new(&vol, Some(snap2))?, &NoProgress)?);
        Ok(())
    })?;
    let inc_manifest = inc_manifest.context("incremental backup produced no manifest")?;

    let mut restic_inc = None;
    let mut borg_inc = None;
    if let Some(t) = &restic {
        say("restic: backup after the change");
        restic_inc = Some(t.incremental(work, &image)?);
    }
    if let Some(t) = &borg {
        say("borg: backup after the change");
        borg_inc = Some(t.incremental(work, &image)?);
    }

    // Restore the express-full backup and check it against the snapshot.
    say("ours: restore and compare");
    let restored = work.join("restored.img");
    let t = Instant::now();
    repo.restore(&inc_manifest.header.id, &restored, &NoProgress)?;
    let restore_secs = t.elapsed().as_secs_f64();
    let exact = hash_file(&restored)? == hash_snapshot(&vol, snap2)?;
    if !exact {
        bail!("the restored image differs from snapshot {snap2}: the benchmark's backup is wrong");
    }

    let step = |s: &Option<Step>| {
        s.as_ref()
            .map(|s| json!({ "secs": s.secs, "repo_growth_bytes": s.growth }))
    };
    let missing = |t: &Option<Tool>, name: &str| {
        if only_ours {
            json!("skipped (--only-ours)")
        } else if t.is_none() {
            json!(format!(
                "{name} is not installed (apt-get install {})",
                if name == "borg" { "borgbackup" } else { name }
            ))
        } else {
            Value::Null
        }
    };
    let ratio = |peer: &Option<Step>, ours: &Step| peer.as_ref().map(|p| p.secs / ours.secs);
    let full_vs_restic = ratio(&restic_full, &full);
    let full_vs_borg = ratio(&borg_full, &full);
    let inc_vs_restic = ratio(&restic_inc, &inc);
    let inc_vs_borg = ratio(&borg_inc, &inc);
    let growth_ratio = inc.growth as f64 / changed_bytes.max(1) as f64;
    Ok(json!({
        "volume": { "size": size, "block_size": bs, "changed_blocks": n_change, "changed_bytes": changed_bytes, "change_pct": pct },
        "ours": {
            "full": { "secs": full.secs, "repo_bytes": full.growth },
            "incremental": { "secs": inc.secs, "repo_growth_bytes": inc.growth, "blocks_read": inc_manifest.header.stats.blocks_read },
            "restore": { "secs": restore_secs, "bit_exact": exact },
        },
        "restic": { "version": restic.as_ref().map(|t| t.version.clone()), "full": step(&restic_full), "incremental": step(&restic_inc), "missing": missing(&restic, "restic") },
        "borg": { "version": borg.as_ref().map(|t| t.version.clone()), "full": step(&borg_full), "incremental": step(&borg_inc), "missing": missing(&borg, "borg") },
        "ratios": {
            "full_speedup_vs_restic": full_vs_restic,
            "full_speedup_vs_borg": full_vs_borg,
            "incremental_speedup_vs_restic": inc_vs_restic,
            "incremental_speedup_vs_borg": inc_vs_borg,
            "incremental_growth_per_changed_byte": growth_ratio,
        },
        "targets": {
            "full_2x_faster_than_restic": full_vs_restic.map(|r| r >= 2.0),
            "full_2x_faster_than_borg": full_vs_borg.map(|r| r >= 2.0),
            "incremental_20x_faster_than_restic": inc_vs_restic.map(|r| r >= 20.0),
            "incremental_growth_at_most_1_5x_changed": growth_ratio <= 1.5,
        },
    }))
}

fn take_snapshot(vol: &Volume) -> Result<u64> {
    let id = vol.reserve_snapshot_id()?;
    vol.create_snapshot(id, &SnapshotOptions { diff_limit: None })?;
    vol.seal_snapshot(id)?;
    Ok(id)
}

/// Runs `f` after flushing dirty pages (so earlier writes do not bill this
/// step), and measures its time and how much `repo` grew.
fn timed(repo: &Path, f: impl FnOnce() -> Result<()>) -> Result<Step> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let before = dir_bytes(repo);
    let t = Instant::now();
    f()?;
    Ok(Step {
        secs: t.elapsed().as_secs_f64(),
        growth: dir_bytes(repo).saturating_sub(before),
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}

fn hash_snapshot(vol: &Volume, id: u64) -> Result<blake3::Hash> {
    let snap = vol.snapshot(id)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0;
    while off < snap.size() {
        let n = ((snap.size() - off) as usize).min(buf.len());
        let mut done = 0;
        while done < n {
            let got = snap.read_at(&mut buf[done..n], off + done as u64)?;
            if got == 0 {
                bail!("snapshot {id} ended early at {}", off + done as u64);
            }
            done += got;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize())
}

/// restic or borg, driven through its command line.
struct Tool {
    name: &'static str,
    version: String,
}

impl Tool {
    fn find(name: &'static str) -> Option<Tool> {
        // restic reports its version with a subcommand, borg with a flag.
        let out = Command::new(name)
            .arg(if name == "restic" {
                "version"
            } else {
                "--version"
            })
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Some(Tool { name, version })
    }

    fn repo(&self, work: &Path) -> PathBuf {
        work.join(self.name)
    }

    fn command(&self, work: &Path) -> Command {
        let mut c = Command::new(self.name);
        c.env("RESTIC_PASSWORD", "freezeframe-bench")
            .env("BORG_PASSPHRASE", "freezeframe-bench")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_BASE_DIR", work.join("borg-home"))
            .env("RESTIC_CACHE_DIR", work.join("restic-cache"));
        c
    }

    fn exec(&self, mut c: Command) -> Result<()> {
        let out = c
            .output()
            .with_context(|| format!("cannot run {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn full(&self, work: &Path, image: &Path) -> Result<Step> {
        let repo = self.repo(work);
        let mut init = self.command(work);
        match self.name {
            "restic" => init.args(["init", "--repo"]).arg(&repo),
            _ => init.args(["init", "-e", "none"]).arg(&repo),
        };
        self.exec(init)?;
        self.backup(work, image, "full")
    }

    fn incremental(&self, work: &Path, image: &Path) -> Result<Step> {
        self.backup(work, image, "incremental")
    }

    fn backup(&self, work: &Path, image: &Path, label: &str) -> Result<Step> {
        let repo = self.repo(work);
        let mut c = self.command(work);
        match self.name {
            "restic" => c.args(["backup", "-q", "--repo"]).arg(&repo).arg(image),
            _ => c
                .arg("create")
                .arg(format!("{}::{label}", repo.display()))
                .arg(image),
        };
        timed(&repo, || self.exec(c))
    }
}

fn print_human(r: &Value) {
    let f = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    let b = |v: &Value| {
        v.as_u64()
            .map(crate::human_bytes)
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "volume {} in {}-byte blocks, {} blocks ({}) changed",
        b(&r["volume"]["size"]),
        r["volume"]["block_size"],
        r["volume"]["changed_blocks"],
        b(&r["volume"]["changed_bytes"])
    );
    println!(
        "{:<8} {:>10} {:>12} {:>10} {:>14}",
        "tool", "full s", "repo", "incr s", "incr growth"
    );
    println!(
        "{:<8} {:>10} {:>12} {:>10} {:>14}",
        "ours",
        f(&r["ours"]["full"]["secs"]),
        b(&r["ours"]["full"]["repo_bytes"]),
        f(&r["ours"]["incremental"]["secs"]),
        b(&r["ours"]["incremental"]["repo_growth_bytes"])
    );
    for tool in ["restic", "borg"] {
        if let Some(m) = r[tool]["missing"].as_str() {
            println!("{tool:<8} {m}");
            continue;
        }
        println!(
            "{:<8} {:>10} {:>12} {:>10} {:>14}",
            tool,
            f(&r[tool]["full"]["secs"]),
            b(&r[tool]["full"]["repo_growth_bytes"]),
            f(&r[tool]["incremental"]["secs"]),
            b(&r[tool]["incremental"]["repo_growth_bytes"])
        );
    }
    println!("ratios: {}", r["ratios"]);
    println!("targets: {}", r["targets"]);
}
