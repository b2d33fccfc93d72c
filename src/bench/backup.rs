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
//!
//! Encryption is on for both peers: restic always encrypts, borg repositories are
//! made with `-e repokey-blake2` and a passphrase from the environment. Our
//! repository format has no encryption; the JSON says so.
//!
//! A `dd bs=1M conv=fsync` copy of the image is the floor of a full backup: the same
//! bytes read and written durably. Every peer run is checked: after each restic and
//! borg backup the backed-up file is read back (`restic dump`, `borg extract
//! --stdout`) and must hash like the source image; the dd copy must hash like it;
//! our express-full backup is restored and compared with its snapshot. A failed
//! check reports an error for that peer, never a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use freezeframe_core::backup::{NoProgress, Repository, VolumeSnapshotSource, DEFAULT_PACK_SIZE};
use freezeframe_core::volume::{SnapshotOptions, Volume};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

use super::peers::{self, Checks};

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
    let (report, checks) = result?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    checks.verdict()
}

fn bench(
    work: &Path,
    size: u64,
    bs: u32,
    pct: f64,
    only_ours: bool,
    json_out: bool,
) -> Result<(Value, Checks)> {
    let mut checks = Checks::default();
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
    let source1 = hash_file(&image)?;
    if source1 != hash_snapshot(&vol, snap1)? {
        bail!("the volume image differs from snapshot {snap1}: the peers would not back up the same bytes");
    }

    // The floor: a durable plain copy of the same bytes.
    say("dd: copy of the image, conv=fsync");
    let dd_copy = work.join("dd-copy.img");
    let dd_run: Option<Option<Step>> = match peers::tool("dd", "coreutils") {
        Err(why) => {
            checks.unavailable("dd copy", &why);
            None
        }
        Ok(_) => {
            let step = timed(&dd_copy, || dd_copy_file(&image, &dd_copy))?;
            let ok = checks.record(
                "dd copy",
                "blake3 of the copy equals the source image's",
                peers::same(&hash_file(&dd_copy)?, &source1, "the dd copy"),
            );
            std::fs::remove_file(&dd_copy)?;
            Some(ok.then_some(step))
        }
    };
    let dd_step = dd_run.as_ref().and_then(|s| s.as_ref());

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
        restic_full = t.full(work, &image, &source1, &mut checks)?;
    }
    if let Some(t) = &borg {
        say("borg: full backup");
        borg_full = t.full(work, &image, &source1, &mut checks)?;
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
    let source2 = hash_file(&image)?;

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
        restic_inc = t.incremental(work, &image, &source2, &mut checks)?;
    }
    if let Some(t) = &borg {
        say("borg: backup after the change");
        borg_inc = t.incremental(work, &image, &source2, &mut checks)?;
    }

    // Restore the express-full backup and check it against the snapshot.
    say("ours: restore and compare");
    let restored = work.join("restored.img");
    let t = Instant::now();
    repo.restore(&inc_manifest.header.id, &restored, &NoProgress)?;
    let restore_secs = t.elapsed().as_secs_f64();
    let exact = checks.record(
        "ours",
        "the express-full backup, restored, hashes like its snapshot",
        peers::same(
            &hash_file(&restored)?,
            &hash_snapshot(&vol, snap2)?,
            "our restore",
        ),
    );

    for (t, name) in [(&restic, "restic"), (&borg, "borg")] {
        if t.is_none() {
            checks.unavailable(name, &missing_reason(only_ours, name));
        }
    }
    let step = |t: &Option<Tool>, s: &Option<Step>| match (t, s) {
        (None, _) => Value::Null,
        (Some(_), None) => {
            json!({ "error": "result check failed: the restored file differs from the source image; no time reported" })
        }
        (Some(_), Some(s)) => json!({ "secs": s.secs, "repo_growth_bytes": s.growth }),
    };
    let missing = |t: &Option<Tool>, name: &str| {
        if t.is_none() {
            json!(missing_reason(only_ours, name))
        } else {
            Value::Null
        }
    };
    let ours_ok = exact;
    let ratio = |peer: &Option<Step>, ours: &Step| {
        peer.as_ref()
            .filter(|_| ours_ok)
            .map(|p| p.secs / ours.secs)
    };
    let full_vs_restic = ratio(&restic_full, &full);
    let full_vs_borg = ratio(&borg_full, &full);
    let inc_vs_restic = ratio(&restic_inc, &inc);
    let inc_vs_borg = ratio(&borg_inc, &inc);
    // Ours relative to the durable plain copy: 2.0 = twice the copy's time.
    let full_to_copy = dd_step.filter(|_| ours_ok).map(|d| full.secs / d.secs);
    let growth_ratio = inc.growth as f64 / changed_bytes.max(1) as f64;
    let report = json!({
        "volume": { "size": size, "block_size": bs, "changed_blocks": n_change, "changed_bytes": changed_bytes, "change_pct": pct },
        "encryption": {
            "ours": "none: the repository format has no encryption",
            "restic": restic.as_ref().map(|_| "on: restic always encrypts (AES-256-CTR + Poly1305-AES), password from RESTIC_PASSWORD"),
            "borg": borg.as_ref().map(|_| "on: borg init -e repokey-blake2 (AES-256-CTR + BLAKE2b MAC), passphrase from BORG_PASSPHRASE"),
        },
        "ours": peers::figures(ours_ok, json!({
            "full": { "secs": full.secs, "repo_bytes": full.growth },
            "incremental": { "secs": inc.secs, "repo_growth_bytes": inc.growth, "blocks_read": inc_manifest.header.stats.blocks_read },
            "restore": { "secs": restore_secs, "bit_exact": exact },
        }), "the restored express-full backup differs from its snapshot"),
        "dd_copy": match &dd_run {
            None => Value::Null,
            Some(None) => json!({ "error": "result check failed: the copy differs from the source image; no time reported" }),
            Some(Some(d)) => json!({ "how": "dd if=<image> of=<copy> bs=1M conv=fsync, after sync", "secs": d.secs }),
        },
        "restic": { "version": restic.as_ref().map(|t| t.version.clone()), "full": step(&restic, &restic_full), "incremental": step(&restic, &restic_inc), "missing": missing(&restic, "restic") },
        "borg": { "version": borg.as_ref().map(|t| t.version.clone()), "full": step(&borg, &borg_full), "incremental": step(&borg, &borg_inc), "missing": missing(&borg, "borg") },
        "ratios": {
            "full_time_to_dd_copy": full_to_copy,
            "full_speedup_vs_restic": full_vs_restic,
            "full_speedup_vs_borg": full_vs_borg,
            "incremental_speedup_vs_restic": inc_vs_restic,
            "incremental_speedup_vs_borg": inc_vs_borg,
            "incremental_growth_per_changed_byte": growth_ratio,
        },
        "checks": checks.json(),
        "targets": {
            "full_at_most_2x_dd_copy": full_to_copy.map(|r| r <= 2.0),
            "full_2x_faster_than_restic": full_vs_restic.map(|r| r >= 2.0),
            "full_2x_faster_than_borg": full_vs_borg.map(|r| r >= 2.0),
            "encryption_on_for_all_three": false,
            "incremental_20x_faster_than_restic": inc_vs_restic.map(|r| r >= 20.0),
            "incremental_growth_at_most_1_5x_changed": growth_ratio <= 1.5,
        },
    });
    Ok((report, checks))
}

fn missing_reason(only_ours: bool, name: &str) -> String {
    if only_ours {
        "skipped (--only-ours)".into()
    } else {
        format!(
            "{name} is not installed (Debian: apt-get install {})",
            if name == "borg" { "borgbackup" } else { name }
        )
    }
}

/// `dd bs=1M conv=fsync` of `src` to `dst`: the bytes read and written durably.
fn dd_copy_file(src: &Path, dst: &Path) -> Result<()> {
    let out = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .args(["bs=1M", "conv=fsync", "status=none"])
        .output()
        .context("run dd")?;
    if !out.status.success() {
        bail!(
            "dd to {}: {}",
            dst.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
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
    peers::hash_file(path)
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

    /// Makes the repository (encrypted) and backs up the image.
    fn full(
        &self,
        work: &Path,
        image: &Path,
        source: &blake3::Hash,
        checks: &mut Checks,
    ) -> Result<Option<Step>> {
        let repo = self.repo(work);
        let mut init = self.command(work);
        match self.name {
            // restic has no unencrypted repositories.
            "restic" => init.args(["init", "--repo"]).arg(&repo),
            _ => init.args(["init", "-e", "repokey-blake2"]).arg(&repo),
        };
        self.exec(init)?;
        self.backup(work, image, "full", source, checks)
    }

    fn incremental(
        &self,
        work: &Path,
        image: &Path,
        source: &blake3::Hash,
        checks: &mut Checks,
    ) -> Result<Option<Step>> {
        self.backup(work, image, "incremental", source, checks)
    }

    /// Backs up the image as archive `label`, then reads the file back out of that
    /// backup and checks it against `source`; the time only when the check passed.
    fn backup(
        &self,
        work: &Path,
        image: &Path,
        label: &str,
        source: &blake3::Hash,
        checks: &mut Checks,
    ) -> Result<Option<Step>> {
        let repo = self.repo(work);
        let mut c = self.command(work);
        match self.name {
            "restic" => c
                .args(["backup", "-q", "--tag", label, "--repo"])
                .arg(&repo)
                .arg(image),
            _ => c
                .arg("create")
                .arg(format!("{}::{label}", repo.display()))
                .arg(image),
        };
        let step = timed(&repo, || self.exec(c))?;
        let mut r = self.command(work);
        let how = match self.name {
            "restic" => {
                r.args(["dump", "-q", "--tag", label, "--repo"])
                    .arg(&repo)
                    .arg("latest")
                    .arg(image);
                "restic dump of the file from this backup"
            }
            _ => {
                // borg stores paths without the leading slash.
                let inside = image.strip_prefix("/").unwrap_or(image);
                r.args(["extract", "--stdout"])
                    .arg(format!("{}::{label}", repo.display()))
                    .arg(inside);
                "borg extract --stdout of the file from this archive"
            }
        };
        let outcome = self.read_back(r).and_then(|got| {
            peers::same(
                &got,
                source,
                &format!("{}'s {label} backup, read back", self.name),
            )
        });
        let ok = checks.record(
            self.name,
            &format!("{label} backup: {how} hashes like the source image"),
            outcome,
        );
        Ok(ok.then_some(step))
    }

    /// blake3 of what a restore command writes to its standard output.
    fn read_back(&self, mut c: Command) -> Result<blake3::Hash, String> {
        let mut child = c
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.name))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let h = peers::hash_reader(stdout).map_err(|e| format!("{e:#}"));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{}: {e}", self.name))?;
        if !out.status.success() {
            return Err(format!(
                "{} restore failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        h
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
