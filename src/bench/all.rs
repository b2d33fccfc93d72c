//! `freezeframe bench all`: every benchmark with its peers in one go, and one summary
//! table (measure, ours, peer, ratio, target, met) with the machine, the load average
//! before and after, and the date.
//!
//! Each benchmark runs as its own `freezeframe bench <name> --json` process, one after
//! the other (so a mount or a node left behind by one cannot slow the next, and one
//! failing does not stop the others); its whole JSON is kept under `benches.<name>`.
//! A benchmark whose peer result check failed exits non-zero after printing its JSON:
//! its figures for that peer are errors, and `bench all` ends with an error too. The
//! targets are those of issue 17's table (and the earlier ones still standing).
//!
//! The fault matrix (`bench faults`, its seeded subset) runs too when this binary has
//! it (asked at run time with `bench faults --help`), unless `--no-faults`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::peers;

/// Flags of `freezeframe bench all`.
#[derive(Args, Debug)]
pub struct BenchAllArgs {
    /// Volume / image size of the volume, mount, backup and replica benchmarks.
    #[arg(long, default_value = "1GiB")]
    size: String,
    /// Snapshot rounds per cluster size.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Cluster sizes of the snapshot benchmark, comma-separated.
    #[arg(long, default_value = "3,8", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// 4 KiB random reads per pass of the mount benchmark.
    #[arg(long, default_value_t = 20_000)]
    random_reads: usize,
    /// Snapshot creates timed per volume size in the volume benchmark.
    #[arg(long, default_value_t = 9)]
    creates: usize,
    /// Where every benchmark puts its files (a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Leave out the fault matrix (`bench faults`) even when this binary has it.
    #[arg(long)]
    no_faults: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Whether this binary has `bench faults` (added by another branch of the project).
fn has_faults_bench() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            Command::new(exe)
                .args(["bench", "faults", "--help"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
        })
        .is_some_and(|s| s.success())
}

/// One benchmark run as a child process: its JSON (if it printed any) and how it ended.
fn run_one(name: &str, args: &[String]) -> Result<Value> {
    let exe = std::env::current_exe().context("locating the freezeframe binary")?;
    eprintln!("bench all: {name} {}", args.join(" "));
    let t = Instant::now();
    let out = Command::new(exe)
        .arg("bench")
        .args(args)
        .arg("--json")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running bench {name}"))?;
    let secs = t.elapsed().as_secs_f64();
    let report: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    Ok(json!({
        "exit_ok": out.status.success(),
        "seconds": secs,
        "report": report,
        "error": (!out.status.success()).then(|| format!("bench {name} {}", out.status)),
    }))
}

/// A number at a JSON path, if the benchmark produced it (not an error, not skipped).
fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// One row of the summary table.
struct Row {
    measure: &'static str,
    unit: &'static str,
    ours: Option<f64>,
    peer: &'static str,
    peer_value: Option<f64>,
    /// How ours compares with the peer (the direction is in `ratio_means`).
    ratio: Option<f64>,
    ratio_means: &'static str,
    target: &'static str,
    met: Option<bool>,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "measure": self.measure, "unit": self.unit, "ours": self.ours,
            "peer": self.peer, "peer_value": self.peer_value,
            "ratio": self.ratio, "ratio_means": self.ratio_means,
            "target": self.target, "met": self.met,
        })
    }
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The rows of the summary, from each benchmark's JSON (`Null` where one failed).
fn rows(benches: &serde_json::Map<String, Value>) -> Vec<Row> {
    let rep = |name: &str| {
        benches
            .get(name)
            .map(|b| b["report"].clone())
            .unwrap_or(Value::Null)
    };
    let (vol, mnt, bak, rep_) = (rep("volume"), rep("mount"), rep("backup"), rep("replica"));
    let mut rows = Vec::new();

    let first = num(&vol, &["ours", "first_write_ratio"]);
    let xfs_first = num(&vol, &["xfs_reflink", "first_write_ratio"]);
    rows.push(Row {
        measure: "first writes after a snapshot, speed vs no snapshot",
        unit: "x",
        ours: first,
        peer: "XFS reflink copy, same pattern",
        peer_value: xfs_first,
        ratio: div(first, xfs_first),
        ratio_means: "ours / XFS's",
        target: ">= 0.5x, and >= XFS reflink's in the same run",
        met: first.map(|f| f >= 0.5 && xfs_first.is_some_and(|x| f >= x)),
    });
    let rewrite = num(&vol, &["ours", "rewrite_ratio"]);
    let xfs_rewrite = num(&vol, &["xfs_reflink", "rewrite_ratio"]);
    rows.push(Row {
        measure: "rewrites of copied blocks, speed vs no snapshot",
        unit: "x",
        ours: rewrite,
        peer: "XFS rewrite after its copy-on-write",
        peer_value: xfs_rewrite,
        ratio: div(rewrite, xfs_rewrite),
        ratio_means: "ours / XFS's",
        target: ">= 0.9x",
        met: rewrite.map(|r| r >= 0.9),
    });
    let c1t = num(&vol, &["snapshot_create_ms_1tib"]);
    let c1g = num(&vol, &["snapshot_create_ms_1gib"]);
    rows.push(Row {
        measure: "snapshot create, 1 TiB sparse volume (median)",
        unit: "ms",
        ours: c1t,
        peer: "same on a 1 GiB volume",
        peer_value: c1g,
        ratio: div(c1t, c1g),
        ratio_means: "1 TiB / 1 GiB",
        target: "< 5 ms, within 1.5x of 1 GiB",
        met: c1t.zip(div(c1t, c1g)).map(|(c, r)| c < 5.0 && r <= 1.5),
    });

    let cs = |k: &str| num(&mnt, &["cold_storage", "sequential_1MiB", k]);
    let (seq_ff, seq_bf, seq_dd) = (cs("freezeframe_GBps"), cs("bindfs_GBps"), cs("dd_GBps"));
    rows.push(Row {
        measure: "snapshot sequential read, page cache dropped",
        unit: "GB/s",
        ours: seq_ff,
        peer: "dd of a plain copy",
        peer_value: seq_dd,
        ratio: div(seq_ff, seq_dd),
        ratio_means: "ours / peer",
        target: ">= 0.9x dd",
        met: div(seq_ff, seq_dd).map(|r| r >= 0.9),
    });
    rows.push(Row {
        measure: "snapshot sequential read, page cache dropped",
        unit: "GB/s",
        ours: seq_ff,
        peer: "bindfs over a plain copy",
        peer_value: seq_bf,
        ratio: div(seq_ff, seq_bf),
        ratio_means: "ours / peer",
        target: ">= 1x bindfs",
        met: div(seq_ff, seq_bf).map(|r| r >= 1.0),
    });
    let cf = |a: &str, k: &str| num(&mnt, &["cold_fuse_cache", a, k]);
    let (f_ff, f_bf) = (
        cf("sequential_1MiB", "freezeframe_GBps"),
        cf("sequential_1MiB", "bindfs_GBps"),
    );
    rows.push(Row {
        measure: "snapshot sequential read, FUSE cache cold",
        unit: "GB/s",
        ours: f_ff,
        peer: "bindfs over a plain copy",
        peer_value: f_bf,
        ratio: div(f_ff, f_bf),
        ratio_means: "ours / peer",
        target: ">= 2x bindfs",
        met: div(f_ff, f_bf).map(|r| r >= 2.0),
    });
    for (mode, measure) in [
        (
            "cold_storage",
            "random 4 KiB snapshot reads, page cache dropped",
        ),
        (
            "cold_fuse_cache",
            "random 4 KiB snapshot reads, FUSE cache cold",
        ),
    ] {
        let ff = num(&mnt, &[mode, "random_4KiB", "freezeframe_iops"]);
        let bf = num(&mnt, &[mode, "random_4KiB", "bindfs_iops"]);
        rows.push(Row {
            measure,
            unit: "reads/s",
            ours: ff,
            peer: "bindfs over a plain copy",
            peer_value: bf,
            ratio: div(ff, bf),
            ratio_means: "ours / peer",
            target: ">= 1.5x bindfs in every mode",
            met: div(ff, bf).map(|r| r >= 1.5),
        });
    }

    let full = num(&bak, &["ours", "full", "secs"]);
    let dd = num(&bak, &["dd_copy", "secs"]);
    rows.push(Row {
        measure: "full backup of the volume",
        unit: "s",
        ours: full,
        peer: "dd conv=fsync copy of the same bytes",
        peer_value: dd,
        ratio: div(full, dd),
        ratio_means: "our time / peer's time",
        target: "<= 2x the copy",
        met: div(full, dd).map(|r| r <= 2.0),
    });
    for (tool, peer) in [
        ("restic", "restic (encrypted)"),
        ("borg", "borg, repokey-blake2 (encrypted)"),
    ] {
        let p = num(&bak, &[tool, "full", "secs"]);
        rows.push(Row {
            measure: "full backup of the volume (ours unencrypted)",
            unit: "s",
            ours: full,
            peer,
            peer_value: p,
            ratio: div(p, full),
            ratio_means: "peer's time / our time (speedup)",
            target: ">= 2x faster",
            met: div(p, full).map(|r| r >= 2.0),
        });
    }
    rows.push(Row {
        measure: "backup encryption on for ours, restic and borg",
        unit: "",
        ours: None,
        peer: "restic and borg: on",
        peer_value: None,
        ratio: None,
        ratio_means: "",
        target: "on for all three",
        met: (!bak.is_null()).then_some(false),
    });
    let inc = num(&bak, &["ours", "incremental", "secs"]);
    let restic_inc = num(&bak, &["restic", "incremental", "secs"]);
    rows.push(Row {
        measure: "backup after a 1% change",
        unit: "s",
        ours: inc,
        peer: "restic (encrypted)",
        peer_value: restic_inc,
        ratio: div(restic_inc, inc),
        ratio_means: "peer's time / our time (speedup)",
        target: ">= 20x faster",
        met: div(restic_inc, inc).map(|r| r >= 20.0),
    });

    let push = num(&rep_, &["full_push", "mb_s"]);
    let tcp = num(&rep_, &["tcp_copy", "mb_s"]);
    rows.push(Row {
        measure: "full replica push over loopback",
        unit: "MiB/s",
        ours: push,
        peer: "plain TCP copy (file -> socket -> file, fsync)",
        peer_value: tcp,
        ratio: div(push, tcp),
        ratio_means: "ours / peer",
        target: ">= 0.7x the TCP copy",
        met: div(push, tcp).map(|r| r >= 0.7),
    });
    let ipush = num(&rep_, &["incremental_push", "seconds"]);
    let rsync = num(&rep_, &["rsync", "update_seconds"]);
    rows.push(Row {
        measure: "replica update after a 1% change",
        unit: "s",
        ours: ipush,
        peer: "rsync -I --inplace --no-whole-file (forced delta)",
        peer_value: rsync,
        ratio: div(rsync, ipush),
        ratio_means: "peer's time / our time (speedup)",
        target: ">= 10x faster",
        met: div(rsync, ipush).map(|r| r >= 10.0),
    });

    for (key, b) in benches {
        let Some(n) = key.strip_prefix("snapshot_") else {
            continue;
        };
        let r = &b["report"];
        let p99 = num(r, &["freeze_window_ms", "p99"]);
        let target = num(r, &["targets", "freeze_window_p99_ms"]);
        let (measure, target_text): (&'static str, &'static str) = match n {
            "3" => ("freeze window p99, 3 nodes", "<= 5 ms"),
            "8" => ("freeze window p99, 8 nodes", "<= 15 ms"),
            _ => ("freeze window p99 (other cluster size: reported)", "none"),
        };
        rows.push(Row {
            measure,
            unit: "ms",
            ours: p99,
            peer: if n == "3" || n == "8" {
                ""
            } else {
                "(see benches)"
            },
            peer_value: None,
            ratio: None,
            ratio_means: "",
            target: target_text,
            met: p99.zip(target).map(|(p, t)| p <= t),
        });
        let hold = num(r, &["initiator_io_hold_ms", "p99"]);
        rows.push(Row {
            measure: if n == "3" {
                "initiator I/O hold p99, 3 nodes"
            } else if n == "8" {
                "initiator I/O hold p99, 8 nodes"
            } else {
                "initiator I/O hold p99 (other cluster size)"
            },
            unit: "ms",
            ours: hold,
            peer: "",
            peer_value: None,
            ratio: None,
            ratio_means: "",
            target: "<= 5 ms",
            met: hold.map(|h| h <= 5.0),
        });
    }
    if let Some(f) = benches.get("faults") {
        let r = &f["report"];
        let pass = num(r, &["summary", "pass"]);
        let run = num(r, &["summary", "run"]);
        let fail = num(r, &["summary", "fail"]);
        rows.push(Row {
            measure: "fault-matrix cells passing (seeded subset)",
            unit: "cells",
            ours: pass,
            peer: "cells run",
            peer_value: run,
            ratio: div(pass, run),
            ratio_means: "passing / run",
            target: "no cell fails (skipped cells are listed in benches.faults)",
            met: pass.zip(fail).map(|(p, f)| p > 0.0 && f == 0.0),
        });
    }
    rows
}

/// Cores, memory, kernel and CPU of this machine.
fn machine() -> Value {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_bytes": mem_kib.map(|k| k * 1024),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu": cpu,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

fn now_utc() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{} UTC", freezeframe_core::units::utc_seconds(ms))
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// Every benchmark, then the summary (JSON or table); an error when a benchmark or
/// a peer's result check failed (after printing).
pub fn run(args: BenchAllArgs) -> Result<()> {
    if args.nodes.is_empty() || args.nodes.contains(&0) {
        bail!("--nodes: give cluster sizes of at least 1, e.g. 3,8");
    }
    let started = now_utc();
    let load_before = peers::loadavg();
    let dir = args.dir.display().to_string();
    let size = args.size.clone();
    let mut plan: Vec<(String, Vec<String>)> = vec![
        (
            "volume".into(),
            vec![
                "volume".into(),
                "--size".into(),
                size.clone(),
                "--creates".into(),
                args.creates.to_string(),
                "--dir".into(),
                dir.clone(),
            ],
        ),
        (
            "mount".into(),
            vec![
                "mount".into(),
                "--size".into(),
                size.clone(),
                "--random-reads".into(),
                args.random_reads.to_string(),
                "--dir".into(),
                dir.clone(),
            ],
        ),
        (
            "backup".into(),
            vec![
                "backup".into(),
                "--size".into(),
                size.clone(),
                "--dir".into(),
                dir.clone(),
            ],
        ),
        (
            "replica".into(),
            vec![
                "replica".into(),
                "--size".into(),
                size.clone(),
                "--dir".into(),
                dir.clone(),
            ],
        ),
    ];
    for n in &args.nodes {
        plan.push((
            format!("snapshot_{n}"),
            vec![
                "snapshot".into(),
                "--nodes".into(),
                n.to_string(),
                "--rounds".into(),
                args.rounds.to_string(),
                "--dir".into(),
                dir.clone(),
            ],
        ));
    }
    if !args.no_faults && has_faults_bench() {
        plan.push((
            "faults".into(),
            vec![
                "faults".into(),
                "--seed".into(),
                "1".into(),
                "--dir".into(),
                dir.clone(),
            ],
        ));
    }
    let mut benches = serde_json::Map::new();
    for (name, a) in &plan {
        benches.insert(name.clone(), run_one(name, a)?);
    }
    let load_after = peers::loadavg();
    let rows = rows(&benches);

    // Every result check of every benchmark, in one list.
    let mut failed = Vec::new();
    let mut unavailable = Vec::new();
    let mut passed = 0usize;
    for (name, b) in &benches {
        if b["exit_ok"] != true || b["report"].is_null() {
            failed.push(format!(
                "{name}: {}",
                b["error"].as_str().unwrap_or("printed no JSON")
            ));
        }
        for c in b["report"]["checks"].as_array().into_iter().flatten() {
            let who = format!("{name}/{}", c["peer"].as_str().unwrap_or("?"));
            match c["status"].as_str() {
                Some("passed") => passed += 1,
                Some("unavailable") => {
                    unavailable.push(format!("{who}: {}", c["detail"].as_str().unwrap_or("")))
                }
                _ => failed.push(format!("{who}: {}", c["detail"])),
            }
        }
    }
    let doc = json!({
        "bench": "all",
        "date": started,
        "finished": now_utc(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "size": args.size,
        "snapshot_rounds": args.rounds,
        "summary": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "checks": { "passed": passed, "failed": failed, "unavailable": unavailable },
        "benches": benches,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_table(&doc, &rows);
    }
    if !failed.is_empty() {
        bail!("bench all: {} failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

fn print_table(doc: &Value, rows: &[Row]) {
    let m = &doc["machine"];
    println!(
        "{} — {} cores, {} GiB, kernel {}, {} build; load average before {}, after {}",
        doc["date"].as_str().unwrap_or(""),
        m["cores"],
        m["memory_bytes"].as_u64().map_or(0, |b| b >> 30),
        m["kernel"].as_str().unwrap_or(""),
        m["build"].as_str().unwrap_or(""),
        doc["loadavg_before"].as_str().unwrap_or(""),
        doc["loadavg_after"].as_str().unwrap_or(""),
    );
    println!(
        "{:<72} {:>10} {:<48} {:>10} {:>8}  {:<42} met",
        "measure", "ours", "peer", "peer", "ratio", "target"
    );
    for r in rows {
        println!(
            "{:<72} {:>10} {:<48} {:>10} {:>8}  {:<42} {}",
            format!("{} ({})", r.measure, r.unit),
            fmt(r.ours),
            r.peer,
            fmt(r.peer_value),
            r.ratio.map_or("-".into(), |x| format!("{}x", fmt(Some(x)))),
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "?",
            }
        );
    }
    let c = &doc["checks"];
    println!(
        "result checks: {} passed, {} failed, {} unavailable",
        c["passed"],
        c["failed"].as_array().map_or(0, Vec::len),
        c["unavailable"].as_array().map_or(0, Vec::len)
    );
    for f in c["failed"].as_array().into_iter().flatten() {
        println!("  FAILED {}", f.as_str().unwrap_or(""));
    }
    for u in c["unavailable"].as_array().into_iter().flatten() {
        println!("  unavailable {}", u.as_str().unwrap_or(""));
    }
}
