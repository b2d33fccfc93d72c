//! `freezeframe bench replica`: what syncing a snapshot to a secondary costs,
//! beside two peers measured in the same run.
//!
//! One run under /var/tmp, everything on loopback:
//! 1. a one-node cluster folder with a volume of `--size` filled with random
//!    data, a snapshot; a secondary (`replica serve`, its own process);
//! 2. full push of the snapshot (time, MB/s, bytes on the wire);
//! 3. `--change` of the blocks overwritten at random, a second snapshot, the
//!    incremental push;
//! 4. rsync of the same image between two local directories with
//!    `rsync --inplace --no-whole-file` (its delta algorithm, no daemon, no ssh):
//!    the initial copy, then the update after the same changes;
//! 5. a plain TCP copy of the same image over loopback (file → socket → file,
//!    fsynced at the end like the replica): the throughput ceiling for the full push.
//!
//! Targets: incremental push at least 10x faster than rsync's update; full
//! push at least half the plain TCP copy's throughput.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use freezeframe_core::units::{parse_block_size, parse_size};
use freezeframe_core::volume::{SnapshotOptions, Volume};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

/// Flags of `freezeframe bench replica`.
#[derive(Args, Debug)]
pub struct BenchReplicaArgs {
    #[arg(long, default_value = "1GiB")]
    size: String,
    #[arg(long, default_value = "64KiB")]
    block_size: String,
    /// Share of blocks changed between the two snapshots, e.g. 1%.
    #[arg(long, default_value = "1%")]
    change: String,
    /// Where to put the volumes and copies (a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[arg(long)]
    json: bool,
}

/// Stops the secondary when the benchmark ends, however it ends.
struct Secondary(Child);

impl Drop for Secondary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn parse_percent(s: &str) -> Result<f64> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .with_context(|| format!("--change {s:?}: expected a percentage like 1%"))?;
    if !(0.0..=100.0).contains(&v) {
        bail!("--change {s:?}: must be between 0% and 100%");
    }
    Ok(v / 100.0)
}

fn snapshot(v: &Volume) -> Result<u64> {
    let id = v.reserve_snapshot_id()?;
    v.create_snapshot(id, &SnapshotOptions::default())?;
    v.seal_snapshot(id)?;
    Ok(id)
}

fn free_udp() -> Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn export_image(v: &Volume, id: u64, path: &Path) -> Result<()> {
    let snap = v.snapshot(id)?;
    let f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0;
    while at < v.size() {
        let n = snap.read_at(&mut buf, at)?;
        f.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

fn rsync(src: &Path, dst_dir: &Path) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new("rsync")
        .arg("--inplace")
        .arg("--no-whole-file")
        .arg(src)
        .arg(dst_dir)
        .output()
        .context("running rsync (is the rsync package installed?)")?;
    if !out.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Durable like the replica: the copy is only done once it is on disk.
    std::fs::File::open(dst_dir.join(src.file_name().unwrap_or_default()))?.sync_all()?;
    Ok(start.elapsed().as_secs_f64())
}

/// File → TCP loopback → file, fsynced at the end; returns seconds.
fn tcp_copy(src: &Path, dst: &Path) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dst = dst.to_path_buf();
    let start = Instant::now();
    let receiver = std::thread::spawn(move || -> Result<u64> {
        let (mut sock, _) = listener.accept()?;
        let mut out = std::fs::File::create(&dst)?;
        let mut buf = vec![0u8; 8 << 20];
        let mut total = 0u64;
        loop {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            total += n as u64;
        }
        out.sync_all()?;
        Ok(total)
    });
    let mut sock = TcpStream::connect(addr)?;
    let mut f = std::fs::File::open(src)?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sock.write_all(&buf[..n])?;
    }
    drop(sock);
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("TCP receiver thread panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    if got != std::fs::metadata(src)?.len() {
        bail!("TCP copy moved {got} bytes, not the whole image");
    }
    Ok(secs)
}

/// Runs the benchmark and prints one JSON object.
pub fn run(args: BenchReplicaArgs) -> Result<()> {
    let size = parse_size(&args.size)?;
    let bs = parse_block_size(&args.block_size)?;
    let change = parse_percent(&args.change)?;
    let tmp = tempfile::Builder::new()
        .prefix("freezeframe-bench-replica-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("temp dir in {}", args.dir.display()))?;
    let root = tmp.path();
    let configs = crate::cluster::init(
        &root.join("c"),
        &crate::cluster::InitOptions {
            nodes: 1,
            size,
            block_size: bs,
            lease: "10s".into(),
        },
    )?;
    let cfg = crate::config::NodeConfig::load(&configs[0])?;
    let v = Volume::open(&cfg.raw.volume.path)?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0004);
    let mut buf = vec![0u8; 8 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        v.write_at(&buf[..n], at)?;
        at += n as u64;
    }
    v.flush()?;
    let s1 = snapshot(&v)?;

    let listen = free_udp()?;
    let rcfg = crate::replica::init_identity(
        &root.join("c"),
        "replica",
        &root.join("r"),
        listen,
        vec!["n1".into()],
    )?;
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(root.join("r/serve.log"))?;
    let _secondary = Secondary(
        Command::new(&exe)
            .arg("--config")
            .arg(&rcfg)
            .args(["replica", "serve", "--dir"])
            .arg(root.join("r/store"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the secondary")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let full = rt.block_on(crate::replica::push(
        &cfg,
        listen,
        "replica",
        Some(s1),
        false,
    ))?;

    // The same random changes go to the volume and, later, to rsync's source image.
    let nblocks = size / bs as u64;
    let k = ((nblocks as f64 * change).ceil() as u64).min(nblocks);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < k {
        chosen.insert(rng.gen_range(0..nblocks));
    }
    let mut changes = Vec::new();
    for &b in &chosen {
        let mut data = vec![0u8; bs as usize];
        rng.fill_bytes(&mut data);
        v.write_at(&data, b * bs as u64)?;
        changes.push((b, data));
    }
    v.flush()?;
    let s2 = snapshot(&v)?;
    let inc = rt.block_on(crate::replica::push(
        &cfg,
        listen,
        "replica",
        Some(s2),
        false,
    ))?;

    let src_dir = root.join("rsync-src");
    let dst_dir = root.join("rsync-dst");
    std::fs::create_dir_all(&src_dir)?;
    std::fs::create_dir_all(&dst_dir)?;
    let image = src_dir.join("volume.img");
    export_image(&v, s1, &image)?;
    let tcp_s = tcp_copy(&image, &root.join("tcp-copy.img"))?;
    let rsync_initial_s = rsync(&image, &dst_dir)?;
    let f = std::fs::OpenOptions::new().write(true).open(&image)?;
    for (b, data) in &changes {
        f.write_all_at(data, b * bs as u64)?;
    }
    f.sync_all()?;
    let rsync_update_s = rsync(&image, &dst_dir)?;

    let mb = |bytes: u64, s: f64| bytes as f64 / (1 << 20) as f64 / s.max(1e-9);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let full_mb_s = mb(size, full.seconds);
    let tcp_mb_s = mb(size, tcp_s);
    let changed_bytes = k * bs as u64;
    let doc = json!({
        "benchmark": "replica",
        "dir": args.dir,
        "size_bytes": size,
        "block_size": bs,
        "changed_blocks": k,
        "changed_bytes": changed_bytes,
        "transport": "QUIC with mutual TLS on loopback (frames of 8 MiB of blocks)",
        "full_push": { "seconds": full.seconds, "mb_s": full_mb_s, "wire_bytes": full.wire_bytes_sent + full.wire_bytes_received, "blocks_sent": full.blocks_sent },
        "incremental_push": {
            "seconds": inc.seconds, "wire_bytes": inc.wire_bytes_sent + inc.wire_bytes_received, "blocks_sent": inc.blocks_sent,
            "wire_to_changed_ratio": ratio((inc.wire_bytes_sent + inc.wire_bytes_received) as f64, changed_bytes as f64),
            "hash_from_saved_cvs": inc.hash_from_saved_cvs,
        },
        "rsync": { "mode": "local rsync --inplace --no-whole-file between two directories (delta algorithm, no daemon, no ssh)", "initial_seconds": rsync_initial_s, "update_seconds": rsync_update_s, "initial_mb_s": mb(size, rsync_initial_s) },
        "tcp_copy": { "mode": "file -> TCP loopback -> file, fsync at end", "seconds": tcp_s, "mb_s": tcp_mb_s },
        "incremental_speedup_vs_rsync_update": ratio(rsync_update_s, inc.seconds),
        "full_push_to_tcp_throughput": ratio(full_mb_s, tcp_mb_s),
        "full_push_to_rsync_initial_speed": ratio(rsync_initial_s, full.seconds),
        "targets": {
            "incremental_speedup_min": 10.0,
            "full_push_to_tcp_min": 0.5,
            "met": ratio(rsync_update_s, inc.seconds) >= 10.0 && ratio(full_mb_s, tcp_mb_s) >= 0.5,
        },
    });
    if args.json {
        println!("{doc}");
    } else {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(())
}
