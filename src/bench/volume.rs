//! `freezeframe bench volume`: what a snapshot costs the live volume.
//!
//! One run, on real disk under /var/tmp (not tmpfs), 1 MiB writes through the
//! engine, each pass ending with a flush so page-cache tricks cannot win:
//! 1. fill the volume (not measured: allocates the file's blocks);
//! 2. overwrite it with no snapshot: the baseline;
//! 3. take a snapshot, overwrite again: every block is copied first (copy-on-write);
//! 4. overwrite once more: blocks already copied, no copy;
//!
//! then the median snapshot create time on fresh 1 GiB and 1 TiB sparse volumes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use freezeframe_core::units::{parse_block_size, parse_size};
use freezeframe_core::volume::{SnapshotOptions, Volume};
use serde_json::json;

/// Flags of `freezeframe bench volume`.
#[derive(Args, Debug)]
pub struct BenchVolumeArgs {
    /// Size of the volume written in the throughput passes.
    #[arg(long, default_value = "1GiB")]
    size: String,
    #[arg(long, default_value = "64KiB")]
    block_size: String,
    /// Where to put the temporary volumes (must be a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Snapshot creates timed per volume size (the median is reported).
    #[arg(long, default_value_t = 9)]
    creates: usize,
    #[arg(long)]
    json: bool,
}

const WRITE: usize = 1 << 20;

fn pass(v: &Volume, fill: u8) -> anyhow::Result<f64> {
    let buf = vec![fill; WRITE];
    let start = Instant::now();
    let mut at = 0u64;
    while at < v.size() {
        let n = (v.size() - at).min(WRITE as u64) as usize;
        v.write_at(&buf[..n], at)?;
        at += n as u64;
    }
    v.flush()?;
    Ok(v.size() as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64())
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

/// Runs the benchmark and prints one JSON object (or a short table).
pub fn run(args: BenchVolumeArgs) -> anyhow::Result<()> {
    let size = parse_size(&args.size)?;
    let bs = parse_block_size(&args.block_size)?;
    let tmp = tempfile::Builder::new()
        .prefix("freezeframe-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("temp dir in {}", args.dir.display()))?;
    let v = Volume::create(&tmp.path().join("bench.img"), size, bs, None)?;
    pass(&v, 1)?;
    let baseline = pass(&v, 2)?;
    let id = v.reserve_snapshot_id()?;
    v.create_snapshot(id, &SnapshotOptions::default())?;
    let first = pass(&v, 3)?;
    let rewrite = pass(&v, 4)?;
    let copied = v.snapshots()?.first().map(|s| s.diff_bytes).unwrap_or(0);
    drop(v);
    let c1g = median_create_ms(tmp.path(), "sparse-1g.img", 1 << 30, bs, args.creates)?;
    let c1t = median_create_ms(tmp.path(), "sparse-1t.img", 1 << 40, bs, args.creates)?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let doc = json!({
        "benchmark": "volume",
        "dir": args.dir,
        "size_bytes": size,
        "block_size": bs,
        "write_bytes": WRITE,
        "no_snapshot_mb_s": baseline,
        "first_write_after_snapshot_mb_s": first,
        "first_write_ratio": ratio(first, baseline),
        "rewrite_after_copy_mb_s": rewrite,
        "rewrite_ratio": ratio(rewrite, baseline),
        "diff_area_bytes_after_first_writes": copied,
        "snapshot_create_ms_1gib": c1g,
        "snapshot_create_ms_1tib": c1t,
        "snapshot_create_ratio_1tib_to_1gib": ratio(c1t, c1g),
        "targets": {
            "first_write_ratio_min": 0.4,
            "rewrite_ratio_min": 0.9,
            "create_ms_max": 5.0,
            "create_ratio_max": 1.5,
            "met": ratio(first, baseline) >= 0.4 && ratio(rewrite, baseline) >= 0.9 && c1g < 5.0 && c1t < 5.0 && ratio(c1t, c1g) <= 1.5,
        },
    });
    if args.json {
        println!("{doc}");
    } else {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(())
}
