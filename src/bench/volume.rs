//! `freezeframe bench volume`: what a snapshot costs the live volume, beside XFS
//! reflink copies doing the same in the same run.
//!
//! One run, on real disk under /var/tmp (not tmpfs), 1 MiB writes, each pass ending
//! with a flush (fdatasync) so page-cache tricks cannot win:
//! 1. fill the volume (not measured: allocates the file's blocks);
//! 2. overwrite it with no snapshot: the baseline;
//! 3. take a snapshot, overwrite again: every block is copied first (copy-on-write);
//! 4. overwrite once more: blocks already copied, no copy;
//!
//! then the same four passes on a file in a loop-mounted XFS image made with
//! `mkfs.xfs -m reflink=1`, with `cp --reflink=always` of the file in place of the
//! snapshot (the first writes after it are XFS's copy-on-write); skipped with a
//! message when not root or when the kernel or xfsprogs lack XFS reflink.
//! Both results are checked after the passes: the snapshot and the reflink copy hold
//! exactly the bytes of pass 2, the live volume and the file those of pass 4.
//! Last, the median snapshot create time on fresh 1 GiB and 1 TiB sparse volumes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use freezeframe_core::units::{parse_block_size, parse_size};
use freezeframe_core::volume::{SnapshotOptions, Volume};
use serde_json::{json, Value};

use super::peers::{self, Checks};

/// Flags of `freezeframe bench volume`.
#[derive(Args, Debug)]
pub struct BenchVolumeArgs {
    /// Size of the volume written in the throughput passes.
    #[arg(long, default_value = "1GiB")]
    size: String,
    #[arg(long, default_value = "64KiB")]
    block_size: String,
    /// Where to put the temporary volumes and the XFS image (a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Snapshot creates timed per volume size (the median is reported).
    #[arg(long, default_value_t = 9)]
    creates: usize,
    #[arg(long)]
    json: bool,
}

const WRITE: usize = 1 << 20;

/// One pass of 1 MiB writes of `fill` over `size` bytes, then a flush; MB/s.
fn timed_pass(
    size: u64,
    fill: u8,
    mut write: impl FnMut(&[u8], u64) -> anyhow::Result<()>,
    flush: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let buf = vec![fill; WRITE];
    let start = Instant::now();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(WRITE as u64) as usize;
        write(&buf[..n], at)?;
        at += n as u64;
    }
    flush()?;
    Ok(size as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
}

fn pass(v: &Volume, fill: u8) -> anyhow::Result<f64> {
    timed_pass(
        v.size(),
        fill,
        |b, at| Ok(v.write_at(b, at)?),
        || Ok(v.flush()?),
    )
}

fn file_pass(f: &File, size: u64, fill: u8) -> anyhow::Result<f64> {
    timed_pass(
        size,
        fill,
        |b, at| Ok(f.write_all_at(b, at)?),
        || Ok(f.sync_data()?),
    )
}

/// Checks that `read` yields `size` bytes all equal to `fill`.
fn expect_fill(
    size: u64,
    fill: u8,
    of: &str,
    mut read: impl FnMut(&mut [u8], u64) -> anyhow::Result<usize>,
) -> Result<(), String> {
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0u64;
    while at < size {
        let want = (size - at).min(buf.len() as u64) as usize;
        let n = read(&mut buf[..want], at).map_err(|e| format!("{of}: read at {at}: {e:#}"))?;
        if n == 0 {
            return Err(format!("{of}: ends at byte {at} of {size}"));
        }
        if let Some(i) = buf[..n].iter().position(|&b| b != fill) {
            return Err(format!(
                "{of}: byte {} is {:#04x}, expected {fill:#04x}",
                at + i as u64,
                buf[i]
            ));
        }
        at += n as u64;
    }
    Ok(())
}

fn median_create_ms(
    dir: &std::path::Path,
    name: &str,
    size: u64,
    bs: u32,
    n: usize,
) -> anyhow::Result<f64> {
    let v = Volume::create(&dir.join(name), size, bs, None)?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let id = v.reserve_snapshot_id()?;
        let start = Instant::now();
        v.create_snapshot(id, &SnapshotOptions::default())?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// An XFS image mounted on a loop device; unmounted (and the loop device freed,
/// `mount -o loop` sets autoclear) on drop.
struct XfsMount(PathBuf);

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run_tool(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{:?} {}: {}",
            cmd.get_program(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{:?}: {e}", cmd.get_program())),
    }
}

/// Makes and mounts the XFS image, or says why XFS reflink is unavailable here.
fn mount_xfs(work: &Path, size: u64) -> Result<XfsMount, String> {
    if !peers::is_root() {
        return Err("needs root to loop-mount an XFS image".into());
    }
    let mkfs = peers::tool("mkfs.xfs", "xfsprogs")?;
    let fs_supported = std::fs::read_to_string("/proc/filesystems")
        .map(|s| s.split_whitespace().any(|w| w == "xfs"))
        .unwrap_or(false);
    let image = work.join("xfs.img");
    // The file, its reflink copy after every block was copied, and room for the log.
    let image_size = 2 * size + (512 << 20);
    File::create(&image)
        .and_then(|f| f.set_len(image_size))
        .map_err(|e| format!("create {}: {e}", image.display()))?;
    run_tool(
        Command::new(mkfs)
            .args(["-q", "-m", "reflink=1"])
            .arg(&image),
    )
    .map_err(|e| format!("mkfs.xfs cannot make a reflink file system: {e}"))?;
    let at = work.join("xfs");
    std::fs::create_dir_all(&at).map_err(|e| format!("create {}: {e}", at.display()))?;
    run_tool(
        Command::new("mount")
            .args(["-t", "xfs", "-o", "loop"])
            .arg(&image)
            .arg(&at),
    )
    .map_err(|e| {
        format!(
            "cannot mount the XFS image{}: {e}",
            if fs_supported {
                ""
            } else {
                " (the kernel lists no xfs in /proc/filesystems)"
            }
        )
    })?;
    Ok(XfsMount(at))
}

/// The XFS reflink peer: the same passes on a file, `cp --reflink=always` in place of
/// the snapshot. Err(reason) when XFS reflink is unavailable; the figures are checked.
fn xfs_reflink(
    work: &Path,
    size: u64,
    checks: &mut Checks,
) -> anyhow::Result<Result<Value, String>> {
    let mnt = match mount_xfs(work, size) {
        Ok(m) => m,
        Err(why) => return Ok(Err(why)),
    };
    let orig = mnt.0.join("file.img");
    let copy = mnt.0.join("reflink-copy.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&orig)
        .with_context(|| format!("create {}", orig.display()))?;
    file_pass(&f, size, 1)?;
    let baseline = file_pass(&f, size, 2)?;
    if let Err(e) = run_tool(
        Command::new("cp")
            .arg("--reflink=always")
            .arg(&orig)
            .arg(&copy),
    ) {
        return Ok(Err(format!("cp --reflink=always failed on XFS: {e}")));
    }
    let first = file_pass(&f, size, 3)?;
    let rewrite = file_pass(&f, size, 4)?;
    let copy_f = File::open(&copy).with_context(|| format!("open {}", copy.display()))?;
    let outcome = expect_fill(size, 2, "the reflink copy", |b, at| {
        Ok(copy_f.read_at(b, at)?)
    })
    .and_then(|()| expect_fill(size, 4, "the rewritten file", |b, at| Ok(f.read_at(b, at)?)));
    let passed = checks.record(
        "xfs reflink",
        "the reflink copy holds exactly the bytes written before it was made (so every first write copied), the file those of the last pass",
        outcome,
    );
    drop((f, copy_f));
    drop(mnt);
    Ok(Ok(peers::figures(
        passed,
        json!({
            "how": "loop-mounted XFS image (mkfs.xfs -m reflink=1); cp --reflink=always of the file in place of the snapshot; same 1 MiB writes, fdatasync per pass",
            "no_reflink_mb_s": baseline,
            "first_write_after_reflink_mb_s": first,
            "first_write_ratio": first / baseline,
            "rewrite_mb_s": rewrite,
            "rewrite_ratio": rewrite / baseline,
        }),
        "the XFS reflink copy or file does not hold the bytes written",
    )))
}

/// Runs the benchmark: one JSON object (errors only for setup failures; a failed
/// result check is in the JSON and in [`Checks::verdict`]).
pub fn measure(args: &BenchVolumeArgs) -> anyhow::Result<(Value, Checks)> {
    let size = parse_size(&args.size)?;
    let bs = parse_block_size(&args.block_size)?;
    if size < (1 << 20) || !size.is_multiple_of(WRITE as u64) {
        bail!("--size must be a whole number of MiB (got {})", args.size);
    }
    let tmp = tempfile::Builder::new()
        .prefix("freezeframe-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("temp dir in {}", args.dir.display()))?;
    let mut checks = Checks::default();
    let v = Volume::create(&tmp.path().join("bench.img"), size, bs, None)?;
    pass(&v, 1)?;
    let baseline = pass(&v, 2)?;
    let id = v.reserve_snapshot_id()?;
    v.create_snapshot(id, &SnapshotOptions::default())?;
    let first = pass(&v, 3)?;
    let rewrite = pass(&v, 4)?;
    let copied = v.snapshots()?.first().map(|s| s.diff_bytes).unwrap_or(0);
    let snap = v.snapshot(id)?;
    let ours_ok = checks.record(
        "ours",
        "the snapshot holds exactly the bytes written before it, the live volume those of the last pass",
        expect_fill(size, 2, "the snapshot", |b, at| Ok(snap.read_at(b, at)?)).and_then(|()| {
            expect_fill(size, 4, "the live volume", |b, at| Ok(v.read_at(b, at)?))
        }),
    );
    drop(snap);
    drop(v);
    let xfs = match xfs_reflink(tmp.path(), size, &mut checks)? {
        Ok(fig) => fig,
        Err(why) => {
            checks.unavailable("xfs reflink", &why);
            json!({ "skipped": why })
        }
    };
    let c1g = median_create_ms(tmp.path(), "sparse-1g.img", 1 << 30, bs, args.creates)?;
    let c1t = median_create_ms(tmp.path(), "sparse-1t.img", 1 << 40, bs, args.creates)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let first_ratio = ratio(first, baseline);
    let xfs_ratio = xfs["first_write_ratio"].as_f64();
    let ours = peers::figures(
        ours_ok,
        json!({
            "no_snapshot_mb_s": baseline,
            "first_write_after_snapshot_mb_s": first,
            "first_write_ratio": first_ratio,
            "rewrite_after_copy_mb_s": rewrite,
            "rewrite_ratio": ratio(rewrite, baseline),
            "diff_area_bytes_after_first_writes": copied,
        }),
        "the snapshot or the live volume does not hold the bytes written",
    );
    let doc = json!({
        "benchmark": "volume",
        "dir": args.dir,
        "size_bytes": size,
        "block_size": bs,
        "write_bytes": WRITE,
        "ours": ours,
        "xfs_reflink": xfs,
        "first_write_ratio_to_xfs_reflink": xfs_ratio.map(|x| first_ratio / x),
        "snapshot_create_ms_1gib": c1g,
        "snapshot_create_ms_1tib": c1t,
        "snapshot_create_ratio_1tib_to_1gib": ratio(c1t, c1g),
        "checks": checks.json(),
        "targets": {
            "first_write_ratio_min": 0.5,
            "first_write_ratio_at_least_xfs_reflink": true,
            "rewrite_ratio_min": 0.9,
            "create_ms_max": 5.0,
            "create_ratio_max": 1.5,
            "met": ours_ok && first_ratio >= 0.5 && xfs_ratio.is_some_and(|x| first_ratio >= x)
                && ratio(rewrite, baseline) >= 0.9 && c1g < 5.0 && c1t < 5.0 && ratio(c1t, c1g) <= 1.5,
        },
    });
    Ok((doc, checks))
}

/// Runs the benchmark and prints one JSON object; fails after printing when a
/// result check failed.
pub fn run(args: BenchVolumeArgs) -> anyhow::Result<()> {
    let (doc, checks) = measure(&args)?;
    if args.json {
        println!("{doc}");
    } else {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    checks.verdict()
}
