//! `freezeframe bench snapshot`: what a cluster-wide snapshot costs the applications.
//!
//! One run: a local cluster of N real node processes (QUIC with mutual TLS on
//! loopback, FUSE mounts), one no-op writer per node (acks every event at
//! once over the real writer socket), then R snapshots initiated from each
//! node in turn. For each: the request-to-complete time seen by the client,
//! the freeze window (first writer frozen → last writer thawed, cluster-wide,
//! from the report), the initiator's I/O hold, and every phase of every node.
//! Each snapshot is deleted after its round (not timed) so the catalog stays
//! small. Printed: p50 / p99 / max of each, beside the targets (freeze window p99
//! ≤ 5 ms at 3 nodes, ≤ 15 ms at 8; other sizes are reported without one) and the
//! anchors of other systems (VSS gives writers 60 s to freeze and holds I/O up
//! to 10 s; NetApp consistency groups fence writes up to 7 s).
//!
//! There is no peer; the result check is ours: every round must report a complete
//! snapshot with a freeze window, else the figures are replaced by an error.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use freezeframe_netproto::control::ControlRequest;
use serde_json::{json, Value};

use super::peers::{self, Checks};
use crate::cluster;
use crate::config::NodeConfig;

#[derive(Args, Debug)]
pub struct BenchSnapshotArgs {
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Where to put the cluster (a real disk).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[arg(long)]
    json: bool,
}

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A writer that registers and acks every event at once.
fn noop_writer(cfg: &NodeConfig) -> Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(cfg.writer_socket())
        .with_context(|| format!("connecting to {}", cfg.writer_socket().display()))?;
    writeln!(
        s,
        "{}",
        json!({"op":"register","name":format!("noop-{}", cfg.name())})
    )?;
    let mut out = s.try_clone()?;
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            let Ok(ev) = serde_json::from_str::<Value>(&line) else {
                return;
            };
            if let (Some(kind), Some(snap)) = (ev["event"].as_str(), ev["snapshot"].as_u64()) {
                let _ = writeln!(out, "{}", json!({"op":"ack","event":kind,"snapshot":snap}));
            }
        }
    });
    Ok(())
}

/// Waits until every node reports its no-op writer registered (bounded).
fn wait_writers(configs: &[NodeConfig], wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    for cfg in configs {
        let name = format!("noop-{}", cfg.name());
        loop {
            let v = crate::client::call_blocking(cfg, &ControlRequest::Status)?;
            if v["writers"]
                .as_array()
                .is_some_and(|a| a.iter().any(|w| w["name"] == name.as_str()))
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the no-op writer on {} did not register within {wait:?}",
                    cfg.name()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    json!({"p50": at(0.5), "p99": at(0.99), "max": v[v.len() - 1], "n": v.len()})
}

/// Runs the benchmark: its JSON and the result check.
pub fn measure(args: &BenchSnapshotArgs) -> Result<(Value, Checks)> {
    if args.nodes < 1 || args.rounds < 1 {
        bail!("--nodes and --rounds must be at least 1");
    }
    crate::demo::ensure_fuse()?;
    let tmp = tempfile::Builder::new()
        .prefix("ff-bench-snapshot-")
        .tempdir_in(&args.dir)?;
    let dir = tmp.path().join("c");
    let paths = cluster::init(
        &dir,
        &cluster::InitOptions {
            nodes: args.nodes,
            size: 64 << 20,
            block_size: 64 << 10,
            lease: "10s".into(),
        },
    )?;
    let configs: Vec<NodeConfig> = paths
        .iter()
        .map(|p| NodeConfig::load(p))
        .collect::<Result<_>>()?;
    let exe = std::env::current_exe()?;
    let mut nodes = Nodes(Vec::new());
    for c in &configs {
        nodes.0.push(cluster::start_node(&exe, c)?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for c in &configs {
        cluster::wait_connected(c, deadline)?;
    }
    for c in &configs {
        noop_writer(c)?;
    }
    wait_writers(&configs, Duration::from_secs(30))?;

    let (mut total, mut window, mut hold) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut failed = 0usize;
    for r in 0..args.rounds {
        let cfg = &configs[r % configs.len()];
        let t = Instant::now();
        let report = crate::client::call_blocking(
            cfg,
            &ControlRequest::SnapshotCreate { timeout_ms: None },
        )?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if report["status"] != "complete" {
            failed += 1;
            eprintln!("round {r}: snapshot failed: {}", report["error"]);
            continue;
        }
        total.push(ms);
        window.extend(report["freeze_window_ms"].as_f64());
        hold.extend(report["io_hold_ms"].as_f64());
        for n in report["nodes"].as_array().into_iter().flatten() {
            let role = if n["node"] == report["initiator"] {
                "initiator"
            } else {
                "other"
            };
            for p in n["phases"].as_array().into_iter().flatten() {
                let d = p["end_ms"].as_f64().unwrap_or(0.0) - p["start_ms"].as_f64().unwrap_or(0.0);
                phases
                    .entry(format!("{role}.{}", p["name"].as_str().unwrap_or("?")))
                    .or_default()
                    .push(d);
            }
        }
        if let Some(id) = report["id"].as_u64() {
            crate::client::call_blocking(cfg, &ControlRequest::SnapshotDelete { id })?;
        }
    }
    drop(nodes);

    let mut checks = Checks::default();
    let ok = checks.record(
        "ours",
        "every round reports a complete snapshot with a freeze window",
        if failed > 0 || window.len() != args.rounds {
            Err(format!(
                "{failed} of {} rounds failed, {} reported a freeze window",
                args.rounds,
                window.len()
            ))
        } else {
            Ok(())
        },
    );
    let w_target = match args.nodes {
        0..=3 => Some(5.0),
        4..=8 => Some(15.0),
        _ => None,
    };
    let h_target = 5.0;
    // Phase timestamps in whole milliseconds give whole-millisecond windows.
    let resolution = if window.iter().all(|w| w.fract() == 0.0) {
        "milliseconds (every window is a whole number of ms)"
    } else {
        "sub-millisecond"
    };
    let w = percentiles(window);
    let h = percentiles(hold);
    let ratio = |v: &Value, target: f64| {
        v["p99"]
            .as_f64()
            .map(|p| if p > 0.0 { target / p } else { f64::INFINITY })
    };
    let doc = json!({
        "bench": "snapshot",
        "timestamp_resolution": resolution,
        "nodes": args.nodes,
        "rounds": args.rounds,
        "failed": failed,
        "request_to_complete_ms": percentiles(total),
        "freeze_window_ms": peers::figures(ok, w.clone(), "not every round completed"),
        "initiator_io_hold_ms": peers::figures(ok, h.clone(), "not every round completed"),
        "phases_ms": phases.into_iter().map(|(k, v)| (k, percentiles(v))).collect::<serde_json::Map<_, _>>(),
        "targets": {
            "freeze_window_p99_ms": w_target, "io_hold_p99_ms": h_target,
            "met": ok && w_target.is_some_and(|t| w["p99"].as_f64().is_some_and(|p| p <= t))
                && h["p99"].as_f64().is_some_and(|p| p <= h_target),
        },
        "ratio_target_to_p99": {"freeze_window": w_target.and_then(|t| ratio(&w, t)), "io_hold": ratio(&h, h_target)},
        "checks": checks.json(),
        "anchors_ms": {"vss_writer_freeze_limit": 60000, "vss_flush_and_hold_limit": 10000, "netapp_cg_write_fence": 7000},
        "ratio_vss_hold_limit_to_our_p99_hold": h["p99"].as_f64().map(|p| 10000.0 / p.max(1.0)),
    });
    Ok((doc, checks))
}

/// Runs the benchmark and prints its JSON (or one line); fails after printing when
/// a round failed.
pub fn run(args: BenchSnapshotArgs) -> Result<()> {
    let (doc, checks) = measure(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "{} nodes, {} rounds: freeze window p50 {} p99 {} ms; I/O hold p99 {} ms; request p50 {} ms",
            args.nodes, args.rounds, doc["freeze_window_ms"]["p50"], doc["freeze_window_ms"]["p99"],
            doc["initiator_io_hold_ms"]["p99"], doc["request_to_complete_ms"]["p50"]
        );
    }
    checks.verdict()
}
