//! `freezeframe bench mount`: how fast the node's FUSE mount serves a snapshot, against
//! `bindfs` (libfuse) serving a plain copy of the same bytes, in the same run.
//!
//! What is measured, in order:
//! 1. live write: the image is filled with random data through `live/volume.img`
//!    (1 MiB writes, then fsync), no snapshot yet, so no copy-before-overwrite;
//! 2. a plain copy of the image is made for bindfs, a snapshot is taken and sealed;
//! 3. sequential 1 MiB reads of the whole `snapshots/<id>/volume.img` and of the copy
//!    through bindfs, then a fixed, seeded set of 4 KiB random reads of each, twice:
//!    - `cold_storage`: the whole page cache dropped before each pass
//!      (`echo 3 > /proc/sys/vm/drop_caches`), so both read the disk;
//!    - `cold_fuse_cache`: the files under the mounts (volume, copy) are in the page
//!      cache, the mounted files are not (`POSIX_FADV_DONTNEED` on them before each
//!      pass): what the FUSE layer itself costs, the figure the targets are about.
//!    Both are plain snapshot reads: no block was overwritten yet, so every read goes
//!    to the volume after a diff-area lookup;
//! 4. a quarter of the volume is overwritten through the mount (live write with
//!    copy-before-overwrite), and the snapshot is read sequentially again, cold: the
//!    mixed figure, a quarter of it from the diff area.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use freezeframe_core::vfs::Vfs;
use freezeframe_core::volume::{SnapshotOptions, Volume};
use rand::{Rng, RngCore, SeedableRng};

const MIB: u64 = 1024 * 1024;

/// Flags of `freezeframe bench mount`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image size, e.g. 1GiB, 256MiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Where the volume, the copy and the mount points go (not tmpfs: this is about storage).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Number of 4 KiB random reads per pass.
    #[arg(long, default_value_t = 20_000)]
    pub random_reads: usize,
    /// Seed of the random offsets and data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    freezeframe_core::units::parse_size(s).map_err(|e| e.to_string())
}

/// Drops the page cache so the next read comes from storage; false if not allowed.
fn drop_caches() -> bool {
    // SAFETY: sync() has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

fn seq_read(path: &Path) -> Result<(u64, f64)> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("read {} at {total}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, t.elapsed().as_secs_f64()))
}

fn random_reads(path: &Path, offsets: &[u64]) -> Result<f64> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for &off in offsets {
        f.read_exact_at(&mut buf, off)
            .with_context(|| format!("read {} at {off}", path.display()))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Writes `len` bytes of random data from `start` through `path` in 1 MiB writes, then
/// fsyncs; returns seconds. Each 4 KiB page is distinct (its offset is stamped in it).
fn write_random(path: &Path, start: u64, len: u64, rng: &mut impl RngCore) -> Result<f64> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {} for write", path.display()))?;
    let mut pool = vec![0u8; 64 * MIB as usize];
    rng.fill_bytes(&mut pool);
    let t = Instant::now();
    let mut off = start;
    while off < start + len {
        let n = MIB.min(start + len - off) as usize;
        let at = (off % (pool.len() as u64 - MIB)) as usize;
        let chunk = &mut pool[at..at + n];
        for (i, page) in chunk.chunks_mut(4096).enumerate() {
            page[..8].copy_from_slice(&(off + i as u64 * 4096).to_le_bytes());
        }
        f.write_all_at(chunk, off)
            .with_context(|| format!("write {} at {off}", path.display()))?;
        off += n as u64;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    Ok(t.elapsed().as_secs_f64())
}

/// A bindfs mount that is unmounted on drop.
struct Bindfs(PathBuf);

impl Bindfs {
    fn mount(src: &Path, at: &Path) -> Result<Bindfs> {
        std::fs::create_dir_all(at)?;
        let out = Command::new("bindfs")
            .arg("-r")
            .arg(src)
            .arg(at)
            .output()
            .context("run bindfs (Debian package bindfs)")?;
        if !out.status.success() {
            bail!(
                "bindfs {} {}: {}",
                src.display(),
                at.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Bindfs(at.to_path_buf()))
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
    }
}

/// Drops the page cache of one file (clean pages), here the mounted ones.
fn fadvise_dontneed(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: a valid open fd; offset 0 and length 0 mean the whole file.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise DONTNEED on {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

/// The freezeframe file and the bindfs file, read the same way.
struct Pair<'a> {
    ff: &'a Path,
    bf: &'a Path,
    offsets: &'a [u64],
    size: u64,
}

/// One sequential pass (GB/s) and one random pass (reads/s), per side.
struct Figures {
    seq_ff: f64,
    seq_bf: f64,
    iops_ff: f64,
    iops_bf: f64,
    reads: usize,
}

impl Pair<'_> {
    /// Sequential then random, each side after `prepare` (which empties some cache).
    fn measure(&self, prepare: &mut dyn FnMut() -> Result<()>) -> Result<Figures> {
        let mut seq = |p: &Path| -> Result<f64> {
            prepare()?;
            let (bytes, secs) = seq_read(p)?;
            if bytes != self.size {
                bail!(
                    "short sequential read of {}: {bytes} of {} bytes",
                    p.display(),
                    self.size
                );
            }
            Ok(gbps(bytes, secs))
        };
        let (seq_ff, seq_bf) = (seq(self.ff)?, seq(self.bf)?);
        let reads = self.offsets.len();
        prepare()?;
        let iops_ff = reads as f64 / random_reads(self.ff, self.offsets)?;
        prepare()?;
        let iops_bf = reads as f64 / random_reads(self.bf, self.offsets)?;
        Ok(Figures {
            seq_ff,
            seq_bf,
            iops_ff,
            iops_bf,
            reads,
        })
    }
}

impl Figures {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "sequential_1MiB": { "freezeframe_GBps": self.seq_ff, "bindfs_GBps": self.seq_bf, "ratio": self.seq_ff / self.seq_bf },
            "random_4KiB": {
                "reads": self.reads, "freezeframe_iops": self.iops_ff, "bindfs_iops": self.iops_bf, "ratio": self.iops_ff / self.iops_bf,
            },
        })
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

pub fn run(args: &Args) -> Result<()> {
    if args.size < 64 * MIB || args.size % MIB != 0 {
        bail!(
            "--size must be a whole number of MiB, at least 64MiB (got {})",
            args.size
        );
    }
    let work = tempfile::Builder::new()
        .prefix("freezeframe-bench-mount.")
        .tempdir_in(&args.dir)
        .with_context(|| format!("temp dir in {}", args.dir.display()))?;
    let vol_path = work.path().join("volume.img");
    let volume = Volume::create(
        &vol_path,
        args.size,
        64 * 1024,
        Some(&work.path().join("state")),
    )
    .context("create the volume")?;
    let mnt = freezeframe_fusefs::mount(
        Arc::new(Vfs::for_volume(volume.clone())),
        &work.path().join("mnt"),
        freezeframe_fusefs::MountConfig::default(),
    )?;
    let live = mnt.mountpoint().join("live/volume.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);

    eprintln!(
        "filling {} MiB through {} ...",
        args.size / MIB,
        live.display()
    );
    let fill_secs = write_random(&live, 0, args.size, &mut rng)?;

    let plain_dir = work.path().join("plain");
    std::fs::create_dir_all(&plain_dir)?;
    std::fs::copy(&vol_path, plain_dir.join("volume.img")).context("copy the image for bindfs")?;
    let bind = Bindfs::mount(&plain_dir, &work.path().join("bindfs"))?;
    let bind_img = bind.0.join("volume.img");

    let id = volume.reserve_snapshot_id()?;
    volume.create_snapshot(id, &SnapshotOptions { diff_limit: None })?;
    volume.seal_snapshot(id)?;
    let snap_img = mnt.mountpoint().join(format!("snapshots/{id}/volume.img"));

    let pages = args.size / 4096;
    let offsets: Vec<u64> = (0..args.random_reads)
        .map(|_| rng.gen_range(0..pages) * 4096)
        .collect();
    let pair = Pair {
        ff: &snap_img,
        bf: &bind_img,
        offsets: &offsets,
        size: args.size,
    };
    let mut cold = true;
    let cold_storage = pair.measure(&mut || {
        cold &= drop_caches();
        Ok(())
    })?;
    let underlying = [vol_path.clone(), plain_dir.join("volume.img")];
    for f in &underlying {
        seq_read(f)?; // into the page cache
    }
    let cold_fuse = pair.measure(&mut || {
        for f in [&snap_img, &bind_img] {
            fadvise_dontneed(f)?;
        }
        Ok(())
    })?;

    eprintln!("overwriting a quarter of the volume through the mount ...");
    let quarter = args.size / 4;
    let cow_secs = write_random(&live, quarter, quarter, &mut rng)?;
    for f in &underlying {
        seq_read(f)?;
    }
    fadvise_dontneed(&snap_img)?;
    let (mixed_bytes, mixed_secs) = seq_read(&snap_img)?;
    drop(bind);
    mnt.unmount()?;

    let report = serde_json::json!({
        "bench": "mount",
        "size_bytes": args.size,
        "dir": args.dir,
        "drop_caches_worked": cold,
        // FUSE throughput is CPU-bound: say how busy the machine was.
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "what": "sealed snapshot image through the freezeframe mount vs the same bytes (a plain copy) through bindfs; \
                 sequential = read(2) of 1 MiB over the whole file; random = seeded 4 KiB-aligned pread(2) of 4 KiB, same offsets for both",
        "cold_storage": cold_storage.json(),
        "cold_fuse_cache": cold_fuse.json(),
        "sequential_mixed_1MiB": {
            "what": "same snapshot, cold FUSE cache, after a quarter of the volume was overwritten (a quarter read from the diff area)",
            "freezeframe_GBps": gbps(mixed_bytes, mixed_secs),
        },
        "live_write_MBps": args.size as f64 / fill_secs / 1e6,
        "live_write_copy_before_overwrite_MBps": quarter as f64 / cow_secs / 1e6,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if !cold {
        eprintln!("warning: could not drop the page cache (needs root): reads were not cold");
    }
    Ok(())
}
