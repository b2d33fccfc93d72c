//! `freezeframe bench mount`: how fast the node's FUSE mount serves a snapshot, against
//! `bindfs` (libfuse) serving a plain copy of the same bytes and `dd` reading that copy,
//! in the same run.
//!
//! What is measured, in order:
//! 1. live write: the image is filled with random data through `live/volume.img`
//!    (1 MiB writes, then fsync), no snapshot yet, so no copy-before-overwrite;
//! 2. a plain copy of the image is made for bindfs and dd, a snapshot is taken and sealed;
//! 3. sequential 1 MiB reads of the whole `snapshots/<id>/volume.img` and of the copy
//!    through bindfs, then a fixed, seeded set of 4 KiB random reads of each, twice:
//!    - `cold_storage`: the whole page cache dropped before each pass
//!      (`echo 3 > /proc/sys/vm/drop_caches`), so both read the disk; `dd` of the plain
//!      copy is timed here too: the disk's own speed on the same bytes;
//!    - `cold_fuse_cache`: the files under the mounts (volume, copy) are in the page
//!      cache, the mounted files are not (`POSIX_FADV_DONTNEED` on them before each
//!      pass): what the FUSE layer itself costs.
//!      Both are plain snapshot reads: no block was overwritten yet, so every read goes
//!      to the volume after a diff-area lookup;
//! 4. a quarter of the volume is overwritten through the mount (live write with
//!    copy-before-overwrite), and the snapshot is read sequentially again, cold: the
//!    mixed figure, a quarter of it from the diff area.
//!
//! Every read is checked: the bytes each side read (kept in one buffer, hashed after
//! the clock stops) must hash like the plain copy; `dd` (of=/dev/null) must report
//! the whole size, and a second, untimed dd run piped into blake3 must match.

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

use super::peers::{self, Checks};

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

/// Sequential 1 MiB read(2)s of a whole file into `buf` (as large as the file, zeroed
/// and paged in before the clock starts); returns bytes read and seconds. The bytes
/// are hashed by the caller after the clock stops: what was read is what is checked.
fn seq_read(path: &Path, buf: &mut [u8]) -> Result<(u64, f64)> {
    buf.fill(0);
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let t = Instant::now();
    let mut total = 0usize;
    loop {
        let end = (total + MIB as usize).min(buf.len());
        if end == total {
            let mut probe = [0u8; 1];
            if f.read(&mut probe)? != 0 {
                bail!("{} is longer than {} bytes", path.display(), buf.len());
            }
            break;
        }
        let n = f
            .read(&mut buf[total..end])
            .with_context(|| format!("read {} at {total}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok((total as u64, t.elapsed().as_secs_f64()))
}

/// Reads a whole file once, to bring it into the page cache.
fn warm(path: &Path) -> Result<()> {
    peers::hash_file(path).map(|_| ())
}

/// 4 KiB pread(2)s at `offsets`, the i-th into `out[i * 4096..]`; returns seconds.
fn random_reads(path: &Path, offsets: &[u64], out: &mut [u8]) -> Result<f64> {
    out.fill(0);
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let t = Instant::now();
    for (&off, page) in offsets.iter().zip(out.chunks_mut(4096)) {
        f.read_exact_at(page, off)
            .with_context(|| format!("read {} at {off}", path.display()))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `dd if=PATH of=/dev/null bs=1M`, timed; returns the bytes dd reports and seconds.
fn dd_read(path: &Path) -> Result<(u64, f64)> {
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["of=/dev/null", "bs=1M"])
        .output()
        .context("run dd")?;
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("dd if={}: {}", path.display(), err.trim());
    }
    let bytes = err
        .lines()
        .find(|l| l.contains("bytes"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("dd printed no byte count: {}", err.trim()))?;
    Ok((bytes, secs))
}

/// blake3 of what `dd if=PATH bs=1M` writes to its standard output.
fn dd_hash(path: &Path) -> Result<blake3::Hash> {
    let mut child = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["bs=1M", "status=none"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run dd")?;
    let h = peers::hash_reader(child.stdout.take().context("dd's stdout")?)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("dd if={} | blake3: dd {status}", path.display());
    }
    Ok(h)
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

/// A figure of one side of one pass.
enum Side {
    /// The side did not run (its tool is unavailable, or it has no place in this pass).
    NotRun,
    /// It ran, and what it read is not the source's bytes: no figure.
    Failed,
    Measured(f64),
}

impl Side {
    fn json(&self) -> serde_json::Value {
        match self {
            Side::NotRun => serde_json::Value::Null,
            Side::Failed => {
                serde_json::json!({"error": "result check failed: the bytes read differ from the source; no figure"})
            }
            Side::Measured(x) => serde_json::json!(x),
        }
    }

    fn ratio(&self, other: &Side) -> serde_json::Value {
        match (self, other) {
            (Side::Measured(a), Side::Measured(b)) if *b > 0.0 => serde_json::json!(a / b),
            _ => serde_json::Value::Null,
        }
    }
}

/// What is read in each pass, and what the bytes read must hash to.
struct Pair<'a> {
    /// The snapshot through the freezeframe mount.
    ff: &'a Path,
    /// The plain copy through bindfs, when bindfs is installed.
    bf: Option<&'a Path>,
    /// The plain copy, read directly by `dd`.
    plain: &'a Path,
    offsets: &'a [u64],
    size: u64,
    /// blake3 of the plain copy, and of its pages at `offsets` in order.
    truth_seq: blake3::Hash,
    truth_random: blake3::Hash,
}

/// Buffers the bytes read land in (sequential: the whole image; random: every page).
struct Bufs {
    seq: Vec<u8>,
    random: Vec<u8>,
}

/// One pass: sequential (GB/s) and random (reads/s) per side.
struct Figures {
    seq_ff: Side,
    seq_bf: Side,
    seq_dd: Side,
    iops_ff: Side,
    iops_bf: Side,
    reads: usize,
}

impl Pair<'_> {
    /// One sequential read of `path` by `peer`, checked against the plain copy.
    fn seq(
        &self,
        peer: &str,
        path: &Path,
        mode: &str,
        bufs: &mut Bufs,
        checks: &mut Checks,
        prepare: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Side> {
        prepare()?;
        let (bytes, secs) = seq_read(path, &mut bufs.seq)?;
        let outcome = if bytes != self.size {
            Err(format!(
                "short read of {}: {bytes} of {} bytes",
                path.display(),
                self.size
            ))
        } else {
            peers::same(
                &blake3::hash(&bufs.seq[..bytes as usize]),
                &self.truth_seq,
                &format!("the bytes read from {}", path.display()),
            )
        };
        let ok = checks.record(
            peer,
            &format!("sequential 1 MiB read(2), {mode}: blake3 of the bytes read equals the plain copy's"),
            outcome,
        );
        Ok(if ok {
            Side::Measured(gbps(bytes, secs))
        } else {
            Side::Failed
        })
    }

    /// The seeded random reads of `path` by `peer`, checked against the plain copy.
    fn random(
        &self,
        peer: &str,
        path: &Path,
        mode: &str,
        bufs: &mut Bufs,
        checks: &mut Checks,
        prepare: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Side> {
        prepare()?;
        let secs = random_reads(path, self.offsets, &mut bufs.random)?;
        let ok = checks.record(
            peer,
            &format!("random 4 KiB pread(2), {mode}: blake3 of the pages read equals the plain copy's same pages"),
            peers::same(
                &blake3::hash(&bufs.random),
                &self.truth_random,
                &format!("the pages read from {}", path.display()),
            ),
        );
        Ok(if ok {
            Side::Measured(self.offsets.len() as f64 / secs)
        } else {
            Side::Failed
        })
    }

    /// Sequential then random, each side after `prepare` (which empties some cache);
    /// `dd` of the plain copy too when `with_dd`.
    fn measure(
        &self,
        mode: &str,
        with_dd: bool,
        bufs: &mut Bufs,
        checks: &mut Checks,
        prepare: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Figures> {
        let seq_ff = self.seq("ours", self.ff, mode, bufs, checks, prepare)?;
        let seq_bf = match self.bf {
            Some(bf) => self.seq("bindfs", bf, mode, bufs, checks, prepare)?,
            None => Side::NotRun,
        };
        let seq_dd = if with_dd {
            prepare()?;
            let (bytes, secs) = dd_read(self.plain)?;
            // dd of=/dev/null keeps nothing: its byte count is checked, and a second,
            // untimed dd of the same file into blake3 shows what dd reads.
            let outcome = if bytes != self.size {
                Err(format!("dd read {bytes} of {} bytes", self.size))
            } else {
                peers::same(&dd_hash(self.plain)?, &self.truth_seq, "dd's output")
            };
            let ok = checks.record(
                "dd",
                &format!("dd bs=1M of the plain copy, {mode}: byte count of the timed run (of=/dev/null) is the size, blake3 of an untimed dd run's output equals the plain copy's"),
                outcome,
            );
            if ok {
                Side::Measured(gbps(bytes, secs))
            } else {
                Side::Failed
            }
        } else {
            Side::NotRun
        };
        let iops_ff = self.random("ours", self.ff, mode, bufs, checks, prepare)?;
        let iops_bf = match self.bf {
            Some(bf) => self.random("bindfs", bf, mode, bufs, checks, prepare)?,
            None => Side::NotRun,
        };
        Ok(Figures {
            seq_ff,
            seq_bf,
            seq_dd,
            iops_ff,
            iops_bf,
            reads: self.offsets.len(),
        })
    }
}

impl Figures {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "sequential_1MiB": {
                "freezeframe_GBps": self.seq_ff.json(), "bindfs_GBps": self.seq_bf.json(), "dd_GBps": self.seq_dd.json(),
                "ratio": self.seq_ff.ratio(&self.seq_bf), "ratio_to_dd": self.seq_ff.ratio(&self.seq_dd),
            },
            "random_4KiB": {
                "reads": self.reads, "freezeframe_iops": self.iops_ff.json(), "bindfs_iops": self.iops_bf.json(),
                "ratio": self.iops_ff.ratio(&self.iops_bf),
            },
        })
    }
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// A buffer of `len` bytes with every page already mapped.
fn paged_in(len: usize) -> Vec<u8> {
    vec![0xa5; len]
}

/// Runs the benchmark: its JSON and the result checks.
pub fn measure(args: &Args) -> Result<(serde_json::Value, Checks)> {
    if args.size < 16 * MIB || !args.size.is_multiple_of(MIB) {
        bail!(
            "--size must be a whole number of MiB, at least 16MiB (got {})",
            args.size
        );
    }
    let mut checks = Checks::default();
    let bindfs = match peers::tool("bindfs", "bindfs") {
        Ok(_) => true,
        Err(why) => {
            checks.unavailable("bindfs", &why);
            false
        }
    };
    let dd = match peers::tool("dd", "coreutils") {
        Ok(_) => true,
        Err(why) => {
            checks.unavailable("dd", &why);
            false
        }
    };
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
    let plain = plain_dir.join("volume.img");
    std::fs::copy(&vol_path, &plain).context("copy the image for bindfs and dd")?;
    let bind = if bindfs {
        Some(Bindfs::mount(&plain_dir, &work.path().join("bindfs"))?)
    } else {
        None
    };
    let bind_img = bind.as_ref().map(|b| b.0.join("volume.img"));

    let id = volume.reserve_snapshot_id()?;
    volume.create_snapshot(id, &SnapshotOptions { diff_limit: None })?;
    volume.seal_snapshot(id)?;
    let snap_img = mnt.mountpoint().join(format!("snapshots/{id}/volume.img"));

    let pages = args.size / 4096;
    let offsets: Vec<u64> = (0..args.random_reads)
        .map(|_| rng.gen_range(0..pages) * 4096)
        .collect();
    let mut bufs = Bufs {
        seq: paged_in(args.size as usize),
        random: paged_in(offsets.len() * 4096),
    };
    // The truth: the plain copy, read directly (untimed).
    let truth_seq = peers::hash_file(&plain)?;
    random_reads(&plain, &offsets, &mut bufs.random)?;
    let truth_random = blake3::hash(&bufs.random);
    let pair = Pair {
        ff: &snap_img,
        bf: bind_img.as_deref(),
        plain: &plain,
        offsets: &offsets,
        size: args.size,
        truth_seq,
        truth_random,
    };
    let mut cold = true;
    let cold_storage = pair.measure(
        "page cache dropped",
        dd,
        &mut bufs,
        &mut checks,
        &mut || {
            cold &= drop_caches();
            Ok(())
        },
    )?;
    let underlying = [vol_path.clone(), plain.clone()];
    for f in &underlying {
        warm(f)?; // into the page cache
    }
    let mounted: Vec<&Path> = std::iter::once(snap_img.as_path())
        .chain(bind_img.as_deref())
        .collect();
    let cold_fuse = pair.measure(
        "FUSE cache cold, files under the mounts cached",
        false,
        &mut bufs,
        &mut checks,
        &mut || {
            for f in &mounted {
                fadvise_dontneed(f)?;
            }
            Ok(())
        },
    )?;

    eprintln!("overwriting a quarter of the volume through the mount ...");
    let quarter = args.size / 4;
    let cow_secs = write_random(&live, quarter, quarter, &mut rng)?;
    for f in &underlying {
        warm(f)?;
    }
    let mixed = pair.seq(
        "ours",
        &snap_img,
        "after a quarter was overwritten (a quarter from the diff area), FUSE cache cold",
        &mut bufs,
        &mut checks,
        &mut || fadvise_dontneed(&snap_img),
    )?;
    drop(bind);
    mnt.unmount()?;

    let report = serde_json::json!({
        "bench": "mount",
        "size_bytes": args.size,
        "dir": args.dir,
        "drop_caches_worked": cold,
        // FUSE throughput is CPU-bound: say how busy the machine was.
        "loadavg": peers::loadavg(),
        "what": "sealed snapshot image through the freezeframe mount vs the same bytes (a plain copy) through bindfs and read by dd; \
                 sequential = read(2) of 1 MiB over the whole file into one buffer, hashed after the clock stops; \
                 random = seeded 4 KiB-aligned pread(2) of 4 KiB, same offsets for both, hashed after the clock stops; \
                 dd = dd if=<plain copy> of=/dev/null bs=1M, page cache dropped",
        "cold_storage": cold_storage.json(),
        "cold_fuse_cache": cold_fuse.json(),
        "sequential_mixed_1MiB": {
            "what": "same snapshot, cold FUSE cache, after a quarter of the volume was overwritten (a quarter read from the diff area)",
            "freezeframe_GBps": mixed.json(),
        },
        "live_write_MBps": args.size as f64 / fill_secs / 1e6,
        "live_write_copy_before_overwrite_MBps": quarter as f64 / cow_secs / 1e6,
        "checks": checks.json(),
    });
    if !cold {
        eprintln!("warning: could not drop the page cache (needs root): reads were not cold");
    }
    Ok((report, checks))
}

/// Runs the benchmark and prints its JSON; fails after printing when a result check failed.
pub fn run(args: &Args) -> Result<()> {
    let (report, checks) = measure(args)?;
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    checks.verdict()
}
