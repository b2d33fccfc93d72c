//! `freezeframe bench faults`: the fault matrix, end to end.
//!
//! A cell is a node **role** (the initiator `n1`, or `n2`, another node) × the
//! **phase** that node is in (freezing, frozen, committing, post_snapshot,
//! thawing) × a **fault** injected right then:
//!
//! | fault | what happens to the target node |
//! |---|---|
//! | `kill` | SIGKILL of its daemon; restarted after the checks |
//! | `stop` | SIGSTOP of its daemon for lease + 0.5 s, then SIGCONT |
//! | `cut` | its QUIC link to the initiator dropped (nftables on loopback) for lease + 0.5 s; for the initiator, its links to every node |
//! | `veto` | its writer vetoes the phase's event (freeze, post_snapshot, thaw), or closes its connection while frozen (frozen, committing: that counts as a veto) |
//! | `slow_hook` | a hook script sleeps 2 × lease in the phase's hook event (freeze, post-snapshot, thaw) |
//!
//! Every cell runs on a fresh cluster of three real node processes (QUIC with
//! mutual TLS on loopback, FUSE mounts) in `--dir`, with a lease of 3 s. The
//! shared volume holds three ext4 filesystems at fixed offsets; node `i`
//! loop-mounts region `i` from its own `live/volume.img`, freezes it with the
//! shipped `assets/hooks.d/10-fsfreeze`, and runs the matrix writer
//! ([`super::fault_writer`]) writing into it. Phases are stretched with writer
//! ack delays and the `FREEZEFRAME_FAILPOINTS` of the daemon (create and seal
//! delays), and watched on the target's event stream, not slept through.
//!
//! Then, within lease + 2 s of the fault, all of these must hold:
//! no writer holds writes (its log shows it resumed); a write + fsync to every
//! ext4 returns (run in a child, so a frozen filesystem is detected, not
//! suffered; a killed node's ext4 may fail with an I/O error, never hang); no
//! snapshot is `open` or complete without a manifest on any running node;
//! every writer connection that got `freeze` for a snapshot got exactly one
//! outcome (`complete` or `abort`) for it (at most one if the connection
//! dropped), and `complete` only for a snapshot that is kept, `abort` only for
//! one that is not. After the faulted node is restarted, continued or
//! reconnected, the next snapshot must complete and every writer be told so.
//!
//! Cells that cannot exist are listed `n/a` with the reason. `--all` runs every
//! cell; otherwise a subset drawn by `--seed` that covers every fault, every
//! phase and both roles. The result is a table (or `--json`); the command
//! fails if any cell failed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use freezeframe_netproto::control::{ControlClient, ControlRequest};
use serde::Serialize;
use serde_json::{json, Value};

use super::fault_writer::{self, mono_ms, What};
use crate::cluster;
use crate::config::NodeConfig;

/// The sample hook, as shipped: the matrix freezes every ext4 with it.
const FSFREEZE_HOOK: &str = include_str!("../../assets/hooks.d/10-fsfreeze");

const NODES: usize = 3;
/// Each node's ext4: 16 MiB at `i * REGION` of the shared volume.
const REGION: u64 = 16 << 20;
const VOLUME: u64 = 64 << 20;
/// The initiator and the "other" target node (indexes); n3 looks on.
const INITIATOR: usize = 0;
const OTHER: usize = 1;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the matrix as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run every cell (about 40, several minutes).
    #[arg(long, conflicts_with = "seed")]
    pub all: bool,
    /// Run the subset drawn by this seed (covers every fault, phase and role).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run only these cells, as ROLE:PHASE:FAULT (e.g. other:frozen:kill). Repeatable.
    #[arg(long = "cell", value_name = "ROLE:PHASE:FAULT")]
    pub cells: Vec<String>,
    /// The lease of the clusters (writer and hook timeouts are derived from it).
    #[arg(long, default_value = "3s")]
    pub lease: String,
    /// Where to put the clusters (a real disk).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Initiator,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Freezing,
    Frozen,
    Committing,
    PostSnapshot,
    Thawing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    Kill,
    Stop,
    Cut,
    Veto,
    SlowHook,
}

const ROLES: [Role; 2] = [Role::Initiator, Role::Other];
const PHASES: [Phase; 5] = [
    Phase::Freezing,
    Phase::Frozen,
    Phase::Committing,
    Phase::PostSnapshot,
    Phase::Thawing,
];
const FAULTS: [Fault; 5] = [
    Fault::Kill,
    Fault::Stop,
    Fault::Cut,
    Fault::Veto,
    Fault::SlowHook,
];

fn name<T: Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn parse<T: Serialize + Copy>(all: &[T], s: &str, what: &str) -> Result<T> {
    all.iter()
        .copied()
        .find(|v| name(*v) == s)
        .with_context(|| {
            format!(
                "unknown {what} {s:?}; one of {}",
                all.iter().map(|v| name(*v)).collect::<Vec<_>>().join(", ")
            )
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Cell {
    pub role: Role,
    pub phase: Phase,
    pub fault: Fault,
}

impl Cell {
    fn parse(s: &str) -> Result<Cell> {
        let parts: Vec<&str> = s.split(':').collect();
        let [r, p, f] = parts[..] else {
            bail!("--cell {s:?}: expected ROLE:PHASE:FAULT, e.g. other:frozen:kill");
        };
        let cell = Cell {
            role: parse(&ROLES, r, "role")?,
            phase: parse(&PHASES, p, "phase")?,
            fault: parse(&FAULTS, f, "fault")?,
        };
        if let Some(why) = cell.not_applicable() {
            bail!("--cell {s}: n/a: {why}");
        }
        Ok(cell)
    }

    fn label(&self) -> String {
        format!(
            "{}:{}:{}",
            name(self.role),
            name(self.phase),
            name(self.fault)
        )
    }

    /// Why this cell cannot exist, if it cannot.
    pub fn not_applicable(&self) -> Option<&'static str> {
        match (self.role, self.phase, self.fault) {
            (Role::Initiator, Phase::Frozen, _) => Some(
                "the initiator is never in frozen: it commits while the other nodes are frozen",
            ),
            (Role::Other, Phase::Committing, _) => {
                Some("only the initiator commits; meanwhile the other nodes are frozen")
            }
            (_, Phase::Frozen | Phase::Committing, Fault::SlowHook) => Some(
                "no hook runs in this phase (hooks run on freeze, post-snapshot, thaw and abort)",
            ),
            _ => None,
        }
    }

    fn target(&self) -> usize {
        match self.role {
            Role::Initiator => INITIATOR,
            Role::Other => OTHER,
        }
    }
}

/// Every cell that can exist, in table order.
pub fn all_cells() -> Vec<Cell> {
    let mut v = Vec::new();
    for role in ROLES {
        for phase in PHASES {
            for fault in FAULTS {
                let c = Cell { role, phase, fault };
                if c.not_applicable().is_none() {
                    v.push(c);
                }
            }
        }
    }
    v
}

/// A subset drawn by `seed` that covers every fault, every phase and both roles.
pub fn seeded_subset(seed: u64) -> Vec<Cell> {
    let mut cells = all_cells();
    // splitmix64 drives a Fisher–Yates shuffle: the same seed, the same subset.
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..cells.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        cells.swap(i, j);
    }
    let (mut faults, mut phases, mut roles) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut pick = Vec::new();
    for c in cells {
        if !faults.contains(&c.fault) || !phases.contains(&c.phase) || !roles.contains(&c.role) {
            faults.insert(c.fault);
            phases.insert(c.phase);
            roles.insert(c.role);
            pick.push(c);
        }
    }
    pick.sort();
    pick
}

/// How a cell stretches its phase and arms its fault.
#[derive(Debug, Default)]
struct Plan {
    /// `FREEZEFRAME_FAILPOINTS` per node.
    failpoints: [Vec<String>; NODES],
    /// Extra fault-writer flags per node.
    writer: [Vec<String>; NODES],
    /// The hook event in which `20-slow` sleeps on the target.
    slow_hook: Option<&'static str>,
}

impl Plan {
    fn of(cell: Cell, lease_ms: u64) -> Plan {
        let mut p = Plan::default();
        let stretch = lease_ms * 2 / 5;
        let t = cell.target();
        let delay = |ev: &str| vec!["--delay".to_string(), format!("{ev}={stretch}")];
        // Keep the target in the phase for `stretch` ms.
        match (cell.role, cell.phase) {
            (Role::Initiator, Phase::Committing) => {
                p.failpoints[INITIATOR].push(format!("create_delay_ms={stretch}"))
            }
            (Role::Initiator, Phase::Thawing) => {
                p.failpoints[INITIATOR].push(format!("seal_delay_ms={stretch}"));
                p.writer[INITIATOR].extend(delay("thaw"));
            }
            // The other node stays frozen while the initiator waits for its own writer.
            (Role::Other, Phase::Frozen) => p.writer[INITIATOR].extend(delay("freeze")),
            (_, Phase::Freezing) => p.writer[t].extend(delay("freeze")),
            (_, Phase::PostSnapshot) => p.writer[t].extend(delay("post_snapshot")),
            (_, Phase::Thawing) => p.writer[t].extend(delay("thaw")),
            (Role::Initiator, Phase::Frozen) | (Role::Other, Phase::Committing) => {}
        }
        match (cell.fault, cell.phase) {
            (Fault::Veto, Phase::Freezing) => {
                p.writer[t].extend(["--veto".into(), "freeze".into()])
            }
            (Fault::Veto, Phase::PostSnapshot) => {
                p.writer[t].extend(["--veto".into(), "post_snapshot".into()])
            }
            (Fault::Veto, Phase::Thawing) => p.writer[t].extend(["--veto".into(), "thaw".into()]),
            (Fault::SlowHook, Phase::Freezing) => p.slow_hook = Some("freeze"),
            (Fault::SlowHook, Phase::PostSnapshot) => p.slow_hook = Some("post-snapshot"),
            (Fault::SlowHook, Phase::Thawing) => p.slow_hook = Some("thaw"),
            _ => {}
        }
        p
    }
}

/// The result of one cell.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    #[serde(flatten)]
    pub cell: Cell,
    /// `pass`, `fail`, `n/a` or `skipped`.
    pub result: String,
    /// Why it failed, is n/a or was skipped (the first problem).
    pub reason: Option<String>,
    /// Every problem seen at the last check.
    pub problems: Vec<String>,
    /// How the faulted snapshot ended, as its initiator reported it.
    pub faulted_snapshot: Option<String>,
    /// Longest time from the fault to a writer resuming writes, ms.
    pub max_resume_after_fault_ms: Option<f64>,
    pub seconds: f64,
}

pub fn run(args: Args) -> Result<()> {
    let lease_ms = crate::config::parse_ms(&args.lease)?;
    if !(1000..=60_000).contains(&lease_ms) {
        bail!("--lease {}: between 1s and 60s for the matrix", args.lease);
    }
    preflight()?;
    let selected: Vec<Cell> = if !args.cells.is_empty() {
        args.cells
            .iter()
            .map(|s| Cell::parse(s))
            .collect::<Result<_>>()?
    } else if args.all {
        all_cells()
    } else {
        seeded_subset(args.seed.unwrap_or(1))
    };
    let nft = which("nft");
    let started = Instant::now();
    let mut results = Vec::new();
    for cell in &selected {
        let t = Instant::now();
        eprintln!("bench faults: {} …", cell.label());
        let mut r = if cell.fault == Fault::Cut && !nft {
            CellResult {
                cell: *cell,
                result: "skipped".into(),
                reason: Some(
                    "nft is not installed (apt-get install nftables): the link cannot be cut"
                        .into(),
                ),
                problems: Vec::new(),
                faulted_snapshot: None,
                max_resume_after_fault_ms: None,
                seconds: 0.0,
            }
        } else {
            run_cell(*cell, lease_ms, &args.dir)
        };
        r.seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "bench faults: {} {} ({:.1} s){}",
            cell.label(),
            r.result,
            r.seconds,
            r.reason
                .as_deref()
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        );
        results.push(r);
    }
    let mut rows = Vec::new();
    for role in ROLES {
        for phase in PHASES {
            for fault in FAULTS {
                let cell = Cell { role, phase, fault };
                if let Some(r) = results.iter().find(|r| r.cell == cell) {
                    rows.push(r.clone());
                } else if let Some(why) = cell.not_applicable() {
                    rows.push(CellResult {
                        cell,
                        result: "n/a".into(),
                        reason: Some(why.into()),
                        problems: Vec::new(),
                        faulted_snapshot: None,
                        max_resume_after_fault_ms: None,
                        seconds: 0.0,
                    });
                }
            }
        }
    }
    let count = |s: &str| results.iter().filter(|r| r.result == s).count();
    let (pass, fail, skipped) = (count("pass"), count("fail"), count("skipped"));
    let doc = json!({
        "bench": "faults",
        "lease_ms": lease_ms,
        "selection": if !args.cells.is_empty() { json!("cells") } else if args.all { json!("all") } else { json!(format!("seed {}", args.seed.unwrap_or(1))) },
        "cells": rows,
        "summary": {"run": results.len(), "pass": pass, "fail": fail, "skipped": skipped,
                    "n/a": rows.iter().filter(|r| r.result == "n/a").count()},
        "seconds": started.elapsed().as_secs_f64(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", table(&rows));
        println!(
            "\n{pass} passed, {fail} failed, {skipped} skipped of {} run in {:.0} s (lease {} ms)",
            results.len(),
            started.elapsed().as_secs_f64(),
            lease_ms
        );
    }
    if fail > 0 {
        bail!("{fail} of {} fault-matrix cells failed", results.len());
    }
    Ok(())
}

/// The matrix as a Markdown table (role × phase rows, fault columns), then the reasons.
pub fn table(rows: &[CellResult]) -> String {
    let mut s = String::from("| role | phase |");
    for f in FAULTS {
        s += &format!(" {} |", name(f));
    }
    s += "\n|---|---|";
    for _ in FAULTS {
        s += "---|";
    }
    s += "\n";
    let mut notes: BTreeMap<String, usize> = BTreeMap::new();
    let mut fails = Vec::new();
    let mut not_run = false;
    for role in ROLES {
        for phase in PHASES {
            s += &format!("| {} | {} |", name(role), name(phase));
            for fault in FAULTS {
                let cell = Cell { role, phase, fault };
                let mark = match rows.iter().find(|r| r.cell == cell) {
                    None => {
                        not_run = true;
                        "·".to_string()
                    }
                    Some(r) if r.result == "n/a" => {
                        let n = notes.len() + 1;
                        let n = *notes
                            .entry(r.reason.clone().unwrap_or_default())
                            .or_insert(n);
                        format!("n/a ({n})")
                    }
                    Some(r) if r.result == "fail" => {
                        fails.push(r.clone());
                        "**fail**".into()
                    }
                    Some(r) => r.result.clone(),
                };
                s += &format!(" {mark} |");
            }
            s += "\n";
        }
    }
    s += "\n";
    if not_run {
        s += "· = not run in this selection.\n\n";
    }
    let mut notes: Vec<_> = notes.into_iter().collect();
    notes.sort_by_key(|(_, n)| *n);
    for (why, n) in notes {
        s += &format!("- ({n}) n/a: {why}\n");
    }
    for r in rows.iter().filter(|r| r.result == "skipped") {
        s += &format!(
            "- {}: skipped: {}\n",
            r.cell.label(),
            r.reason.as_deref().unwrap_or("")
        );
    }
    for r in fails {
        s += &format!("- {}: {}\n", r.cell.label(), r.problems.join("; "));
    }
    s
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// What every cell needs; a clear error naming what is missing.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench faults must run as root (it loop-mounts and freezes ext4 filesystems)");
    }
    if !Path::new("/dev/fuse").exists() || !which("fusermount3") {
        bail!("bench faults needs FUSE (/dev/fuse and fusermount3: apt-get install fuse3)");
    }
    for cmd in ["mkfs.ext4", "fsfreeze", "mount", "umount", "sync"] {
        if !which(cmd) {
            bail!(
                "bench faults needs {cmd} (apt-get install e2fsprogs util-linux mount coreutils)"
            );
        }
    }
    Ok(())
}

fn run_cell(cell: Cell, lease_ms: u64, dir: &Path) -> CellResult {
    let mut out = CellResult {
        cell,
        result: "fail".into(),
        reason: None,
        problems: Vec::new(),
        faulted_snapshot: None,
        max_resume_after_fault_ms: None,
        seconds: 0.0,
    };
    match Rig::new(cell, lease_ms, dir).and_then(|mut rig| rig.run(&mut out)) {
        Ok(problems) => out.problems = problems,
        Err(e) => out.problems = vec![format!("harness: {e:#}")],
    }
    out.result = if out.problems.is_empty() {
        "pass"
    } else {
        "fail"
    }
    .into();
    out.reason = out.problems.first().cloned();
    out
}

/// A node's events, read by a thread that subscribed before the cell started.
struct Events {
    rx: mpsc::Receiver<Value>,
}

impl Events {
    fn subscribe(cfg: &NodeConfig) -> Result<Events> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = cfg.control_socket();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let sub = async {
                    let mut c = ControlClient::connect(&path).await?;
                    c.subscribe().await?;
                    anyhow::Ok(c)
                };
                let mut c = match sub.await {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                while let Ok(Some(ev)) = c.next_event().await {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            });
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Events { rx }),
            Ok(Err(e)) => bail!("subscribing to events of {}: {e}", cfg.name()),
            Err(_) => bail!("subscribing to events of {}: no answer in 10 s", cfg.name()),
        }
    }

    /// Waits for `node` to enter `phase`; returns the snapshot id.
    fn wait_enter(&self, node: &str, phase: &str, wait: Duration) -> Option<u64> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let ev = self.rx.recv_timeout(left).ok()?;
            if ev["node"] == node
                && ev["phase"] == phase
                && ev["edge"] == "enter"
                && ev.get("writer").is_none_or(Value::is_null)
            {
                return ev["snapshot"].as_u64();
            }
        }
    }
}

/// A snapshot request running on its own thread (its initiator may be stopped).
struct Request {
    rx: mpsc::Receiver<Result<Value, String>>,
}

impl Request {
    fn start(cfg: &NodeConfig) -> Request {
        let (tx, rx) = mpsc::channel();
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let r = crate::client::call_blocking(
                &cfg,
                &ControlRequest::SnapshotCreate { timeout_ms: None },
            )
            .map_err(|e| format!("{e:#}"));
            let _ = tx.send(r);
        });
        Request { rx }
    }

    fn wait(&self, wait: Duration) -> Option<Result<Value, String>> {
        self.rx.recv_timeout(wait).ok()
    }
}

fn describe(report: &Result<Value, String>) -> String {
    match report {
        Ok(v) if v["status"] == "complete" => format!("snapshot {} complete", v["id"]),
        Ok(v) => format!(
            "snapshot {} failed: node {} writer {} phase {}: {}",
            v["id"],
            v["error"]["node"].as_str().unwrap_or("?"),
            v["error"]["writer"].as_str().unwrap_or("-"),
            v["error"]["phase"].as_str().unwrap_or("?"),
            v["error"]["reason"].as_str().unwrap_or("?")
        ),
        Err(e) => format!("request ended without a report: {e}"),
    }
}

/// One fresh cluster for one cell; dropping it undoes everything, whatever happened.
struct Rig {
    _tmp: tempfile::TempDir,
    exe: PathBuf,
    cell: Cell,
    plan: Plan,
    lease_ms: u64,
    configs: Vec<NodeConfig>,
    nodes: Vec<Option<Child>>,
    stopped: Vec<bool>,
    killed: Vec<bool>,
    /// Each node's ext4 mount point and whether it is mounted.
    fs: Vec<PathBuf>,
    mounted: Vec<bool>,
    writers: Vec<Child>,
    logs: Vec<PathBuf>,
    /// The nftables table that cuts links, while it exists.
    cut: Option<String>,
    /// Probe children that did not return (reaped on drop, after the thaw).
    stuck: Vec<Child>,
}

impl Rig {
    fn new(cell: Cell, lease_ms: u64, dir: &Path) -> Result<Rig> {
        let tmp = tempfile::Builder::new()
            .prefix("ff-bench-faults-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a folder in {}", dir.display()))?;
        let cdir = tmp.path().join("c");
        let paths = cluster::init(
            &cdir,
            &cluster::InitOptions {
                names: None,
                nodes: NODES,
                size: VOLUME,
                block_size: 64 << 10,
                lease: format!("{lease_ms}ms"),
            },
        )?;
        // Timeouts below the lease, as the config bounds require.
        for p in &paths {
            let text = std::fs::read_to_string(p)?;
            let mut file: crate::config::NodeFile = toml::from_str(&text)?;
            file.cluster.writer_timeout = Some(format!("{}ms", lease_ms / 2));
            file.cluster.hook_timeout = Some(format!("{}ms", lease_ms / 2));
            std::fs::write(p, toml::to_string_pretty(&file)?)?;
        }
        let configs: Vec<NodeConfig> = paths
            .iter()
            .map(|p| NodeConfig::load(p))
            .collect::<Result<_>>()?;
        let plan = Plan::of(cell, lease_ms);
        let mut rig = Rig {
            exe: std::env::current_exe()?,
            cell,
            plan,
            lease_ms,
            nodes: (0..NODES).map(|_| None).collect(),
            stopped: vec![false; NODES],
            killed: vec![false; NODES],
            fs: (0..NODES)
                .map(|i| tmp.path().join(format!("fs-n{}", i + 1)))
                .collect(),
            mounted: vec![false; NODES],
            writers: Vec::new(),
            logs: (0..NODES)
                .map(|i| tmp.path().join(format!("writer-n{}.jsonl", i + 1)))
                .collect(),
            cut: None,
            stuck: Vec::new(),
            configs,
            _tmp: tmp,
        };
        // The filesystems, straight into the fresh shared image (no snapshot exists yet).
        let image = cdir.join("shared/volume.img");
        for i in 0..NODES {
            sh(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-E"])
                .arg(format!("offset={}", i as u64 * REGION))
                .arg(&image)
                .arg((REGION / 4096).to_string()))
            .with_context(|| format!("mkfs.ext4 of n{}'s region", i + 1))?;
            std::fs::create_dir_all(&rig.fs[i])?;
        }
        for i in 0..NODES {
            rig.install_hooks(i)?;
        }
        for i in 0..NODES {
            rig.start_node(i)?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for c in &rig.configs {
            cluster::wait_connected(c, deadline)?;
        }
        for i in 0..NODES {
            rig.mount_fs(i)?;
        }
        for i in 0..NODES {
            rig.start_writer(i)?;
        }
        rig.wait_writers_registered(Duration::from_secs(10))?;
        Ok(rig)
    }

    fn node_name(&self, i: usize) -> &str {
        self.configs[i].name()
    }

    fn install_hooks(&self, i: usize) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let cfg = &self.configs[i];
        let hooks = cfg
            .raw
            .node
            .hooks_dir
            .clone()
            .context("the cluster's nodes have a hooks_dir")?;
        // The shipped hook, configured by its documented lines.
        let fs = self.fs[i].display().to_string();
        let hook = FSFREEZE_HOOK
            .replacen("MOUNTPOINT=\"\"", &format!("MOUNTPOINT=\"{fs}\""), 1)
            .replacen(
                "FREEZEFRAME_LEASE_MS:-600000",
                &format!("FREEZEFRAME_LEASE_MS:-{}", self.lease_ms),
                1,
            )
            .replacen(
                "FREEZEFRAME_FSFREEZE_STATE:-/run/freezeframe-fsfreeze",
                &format!(
                    "FREEZEFRAME_FSFREEZE_STATE:-{}",
                    self._tmp.path().join("fsfreeze-state").display()
                ),
                1,
            );
        if !hook.contains(&format!("MOUNTPOINT=\"{fs}\""))
            || !hook.contains(&format!("FREEZEFRAME_LEASE_MS:-{}", self.lease_ms))
        {
            bail!(
                "assets/hooks.d/10-fsfreeze has no MOUNTPOINT=\"\" or LEASE_MS line to configure"
            );
        }
        let mut scripts = vec![("10-fsfreeze", hook)];
        if let (Some(event), true) = (self.plan.slow_hook, i == self.cell.target()) {
            // After 10-fsfreeze on freeze (the filesystem is frozen while it sleeps),
            // before it on thaw (it stays frozen while it sleeps); snapshot 1 only.
            scripts.push((
                "20-slow",
                format!(
                    "#!/bin/sh\n# The fault matrix's slow hook.\n[ \"$1\" = \"{event}\" ] && [ \"$FREEZEFRAME_SNAPSHOT\" = 1 ] && exec sleep {}\nexit 0\n",
                    self.lease_ms * 2 / 1000 + 1
                ),
            ));
        }
        for (name, body) in scripts {
            let p = hooks.join(name);
            std::fs::write(&p, body)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        let fp = self.plan.failpoints[i].join(",");
        let mut env = vec![("RUST_LOG", "info".to_string())];
        if !fp.is_empty() {
            env.push(("FREEZEFRAME_FAILPOINTS", fp));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.nodes[i] = Some(cluster::start_node_with_env(
            &self.exe,
            &self.configs[i],
            &env,
        )?);
        self.killed[i] = false;
        Ok(())
    }

    fn mount_fs(&mut self, i: usize) -> Result<()> {
        let live = self.configs[i].raw.node.mount.join("live/volume.img");
        sh(Command::new("mount")
            .args(["-t", "ext4", "-o"])
            .arg(format!(
                "loop,offset={},sizelimit={REGION}",
                i as u64 * REGION
            ))
            .arg(&live)
            .arg(&self.fs[i]))
        .with_context(|| format!("loop-mounting n{}'s ext4 from {}", i + 1, live.display()))?;
        self.mounted[i] = true;
        Ok(())
    }

    fn start_writer(&mut self, i: usize) -> Result<()> {
        let cfg = &self.configs[i];
        let child = Command::new(&self.exe)
            .args(["bench", "fault-writer", "--name"])
            .arg(format!("w-{}", cfg.name()))
            .arg("--socket")
            .arg(cfg.writer_socket())
            .arg("--log")
            .arg(&self.logs[i])
            .arg("--data")
            .arg(self.fs[i].join("data.log"))
            .args(["--only-snapshot", "1"])
            .arg("--freeze-timeout-ms")
            .arg((self.lease_ms * 4 / 5).to_string())
            .args(&self.plan.writer[i])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the fault writer")?;
        self.writers.push(child);
        Ok(())
    }

    fn wait_writers_registered(&self, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        for (i, cfg) in self.configs.iter().enumerate() {
            let want = format!("w-{}", cfg.name());
            loop {
                let ok = crate::client::call_blocking(cfg, &ControlRequest::Status)
                    .map(|v| {
                        v["writers"]
                            .as_array()
                            .is_some_and(|ws| ws.iter().any(|w| w["name"] == want.as_str()))
                    })
                    .unwrap_or(false);
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "writer {want} did not register with n{} within {wait:?}",
                        i + 1
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn signal(&mut self, i: usize, sig: i32) {
        if let Some(c) = &self.nodes[i] {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
        match sig {
            libc::SIGSTOP => self.stopped[i] = true,
            libc::SIGCONT => self.stopped[i] = false,
            _ => {}
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            wait_bounded(&mut c, Duration::from_secs(5));
        }
        self.killed[i] = true;
    }

    /// Drops UDP between the target and the initiator (or, for the initiator, every node).
    fn cut_links(&mut self) -> Result<()> {
        let t = self.cell.target();
        let port = |i: usize| self.configs[i].raw.node.listen.port();
        let pairs: Vec<(u16, u16)> = if t == INITIATOR {
            (0..NODES)
                .filter(|&i| i != INITIATOR)
                .map(|i| (port(INITIATOR), port(i)))
                .collect()
        } else {
            vec![(port(t), port(INITIATOR))]
        };
        let table = format!("ff_faults_{}", std::process::id());
        let mut script = format!(
            "add table inet {table}\nadd chain inet {table} out {{ type filter hook output priority 0 ; policy accept ; }}\n"
        );
        for (a, b) in pairs {
            script += &format!("add rule inet {table} out udp sport {a} udp dport {b} drop\n");
            script += &format!("add rule inet {table} out udp sport {b} udp dport {a} drop\n");
        }
        let f = self._tmp.path().join("cut.nft");
        std::fs::write(&f, script)?;
        self.cut = Some(table);
        sh(Command::new("nft").arg("-f").arg(&f)).context("nft: cutting the link")?;
        Ok(())
    }

    fn restore_links(&mut self) {
        if let Some(table) = self.cut.take() {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &table])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// The cell: the faulted snapshot, the checks, recovery, the next snapshot.
    fn run(&mut self, out: &mut CellResult) -> Result<Vec<String>> {
        let t = self.cell.target();
        let lease = Duration::from_millis(self.lease_ms);
        let target = self.node_name(t).to_string();
        let events = Events::subscribe(&self.configs[t])?;
        let req = Request::start(&self.configs[INITIATOR]);
        let phase = name(self.cell.phase);
        let Some(snapshot) = events.wait_enter(&target, &phase, Duration::from_secs(10)) else {
            let report = req.wait(Duration::from_secs(10));
            bail!(
                "{target} was never seen in {phase} (so the fault was not injected); the snapshot: {}",
                report.as_ref().map(describe).unwrap_or_else(|| "no report".into())
            );
        };
        if snapshot != 1 {
            bail!("the first snapshot of a fresh cluster is {snapshot}, not 1");
        }
        // The fault, now.
        let fault_at = mono_ms();
        let t0 = Instant::now();
        let mut undo_at = None;
        match self.cell.fault {
            Fault::Kill => self.kill(t),
            Fault::Stop => {
                self.signal(t, libc::SIGSTOP);
                undo_at = Some(t0 + lease + Duration::from_millis(500));
            }
            Fault::Cut => {
                self.cut_links()?;
                undo_at = Some(t0 + lease + Duration::from_millis(500));
            }
            Fault::Veto if matches!(self.cell.phase, Phase::Frozen | Phase::Committing) => {
                // Closing the connection while frozen counts as a veto.
                // SAFETY: signalling our own child.
                unsafe { libc::kill(self.writers[t].id() as i32, libc::SIGUSR1) };
            }
            // Armed before the snapshot: the writer's veto, the slow hook.
            Fault::Veto | Fault::SlowHook => {}
        }
        // Within lease + 2 s, every promise holds.
        let deadline = t0 + lease + Duration::from_secs(2);
        let mut problems;
        loop {
            if undo_at.is_some_and(|at| Instant::now() >= at) {
                undo_at = None;
                self.undo_fault(t);
            }
            problems = self.check_promises(fault_at);
            if problems.is_empty() && undo_at.is_none() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if undo_at.is_some() {
            self.undo_fault(t);
        }
        out.max_resume_after_fault_ms = self.max_resume_after(fault_at);
        out.faulted_snapshot = req.wait(Duration::from_millis(100)).as_ref().map(describe);
        let mut problems: Vec<String> = problems
            .into_iter()
            .map(|p| format!("within lease + 2 s: {p}"))
            .collect();

        // Recovery, then the next snapshot must succeed everywhere.
        if self.killed[t] {
            self.start_node(t)?;
            if self.mounted[t] {
                let _ = Command::new("umount").arg("-l").arg(&self.fs[t]).status();
                self.mounted[t] = false;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for c in &self.configs {
            if let Err(e) = cluster::wait_connected(c, deadline) {
                problems.push(format!("after recovery: {e:#}"));
                return Ok(problems);
            }
        }
        if !self.mounted[t] {
            self.mount_fs(t)?;
        }
        if out.faulted_snapshot.is_none() {
            out.faulted_snapshot = req.wait(Duration::from_secs(5)).as_ref().map(describe);
        }
        if let Err(e) = self.wait_writers_registered(Duration::from_secs(10)) {
            problems.push(format!("after recovery: {e:#}"));
            return Ok(problems);
        }
        let next = Request::start(&self.configs[INITIATOR]);
        match next.wait(lease + Duration::from_secs(10)) {
            Some(Ok(v)) if v["status"] == "complete" => {
                let id = v["id"].as_u64().unwrap_or(0);
                let deadline = Instant::now() + Duration::from_secs(2);
                let seen: Vec<String> = problems.clone();
                loop {
                    let mut p = self.check_promises(fault_at);
                    p.extend(self.check_took_part(id));
                    // What the faulted snapshot left is reported once, above.
                    p.retain(|p| !seen.iter().any(|s| s.ends_with(p.as_str())));
                    if p.is_empty() || Instant::now() >= deadline {
                        problems.extend(p.into_iter().map(|p| format!("next snapshot: {p}")));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Some(r) => problems.push(format!("next snapshot: {}", describe(&r))),
            None => problems.push(format!(
                "next snapshot: no report within {} s",
                (lease + Duration::from_secs(10)).as_secs()
            )),
        }
        Ok(problems)
    }

    fn undo_fault(&mut self, t: usize) {
        match self.cell.fault {
            Fault::Stop => self.signal(t, libc::SIGCONT),
            Fault::Cut => self.restore_links(),
            _ => {}
        }
    }

    /// The promises at this instant; empty when all hold.
    fn check_promises(&mut self, fault_at: f64) -> Vec<String> {
        let mut problems = Vec::new();
        let logs: Vec<_> = (0..NODES)
            .map(|i| fault_writer::read_log(&self.logs[i]).unwrap_or_default())
            .collect();
        // Nothing holds writes.
        for (i, log) in logs.iter().enumerate() {
            let last = log.iter().rev().find_map(|l| match &l.what {
                What::Hold { snapshot, .. } => Some((true, *snapshot, l.t_ms)),
                What::Resume { snapshot, .. } => Some((false, *snapshot, l.t_ms)),
                _ => None,
            });
            if let Some((true, s, t)) = last {
                problems.push(format!(
                    "writer w-{} still holds writes for snapshot {s} ({:.1} s after the fault)",
                    self.node_name(i),
                    (mono_ms() - t.max(fault_at)) / 1e3
                ));
            }
        }
        for (i, w) in self.writers.iter_mut().enumerate() {
            if let Ok(Some(st)) = w.try_wait() {
                problems.push(format!("writer on n{} exited: {st}", i + 1));
            }
        }
        // Nothing is frozen: a write + fsync to every ext4 returns.
        problems.extend(self.probe_filesystems());
        // No snapshot left open or half-registered; outcomes match what was kept.
        let mut listed: Option<Vec<Value>> = None;
        for i in 0..NODES {
            if self.killed[i] || self.stopped[i] {
                continue;
            }
            match crate::client::call_blocking(&self.configs[i], &ControlRequest::SnapshotList) {
                Ok(Value::Array(rows)) => {
                    for r in &rows {
                        if r["status"] == "open" {
                            problems.push(format!(
                                "snapshot {} is left open (seen from {})",
                                r["id"],
                                self.node_name(i)
                            ));
                        } else if r["status"] == "complete" && r["initiator"].is_null() {
                            problems.push(format!(
                                "snapshot {} is complete without a manifest (seen from {})",
                                r["id"],
                                self.node_name(i)
                            ));
                        }
                    }
                    listed.get_or_insert(rows);
                }
                Ok(v) => problems.push(format!("snapshot list on {}: {v}", self.node_name(i))),
                Err(e) => problems.push(format!("snapshot list on {}: {e:#}", self.node_name(i))),
            }
        }
        let kept: BTreeSet<u64> = listed
            .iter()
            .flatten()
            .filter(|r| r["status"] == "complete")
            .filter_map(|r| r["id"].as_u64())
            .collect();
        for (i, log) in logs.iter().enumerate() {
            problems.extend(outcome_problems(
                &format!("w-{}", self.node_name(i)),
                log,
                listed.as_ref().map(|_| &kept),
            ));
        }
        problems
    }

    /// Every writer's current connection took part in snapshot `id` (was asked to freeze).
    fn check_took_part(&self, id: u64) -> Vec<String> {
        let mut p = Vec::new();
        for i in 0..NODES {
            let log = fault_writer::read_log(&self.logs[i]).unwrap_or_default();
            let conn = log.iter().map(|l| l.conn).max().unwrap_or(0);
            let froze = log.iter().any(|l| {
                l.conn == conn
                    && matches!(&l.what, What::Event { event }
                        if event["event"] == "freeze" && event["snapshot"] == id)
            });
            if !froze {
                p.push(format!(
                    "writer w-{} was not asked to freeze for snapshot {id}",
                    self.node_name(i)
                ));
            }
        }
        p
    }

    /// Runs `printf >> probe && sync probe` on every ext4 in children, bounded.
    fn probe_filesystems(&mut self) -> Vec<String> {
        const BOUND: Duration = Duration::from_millis(1500);
        let mut problems = Vec::new();
        let mut running = Vec::new();
        for i in 0..NODES {
            // A stopped daemon cannot serve its FUSE mount: its ext4 waits for SIGCONT.
            if self.stopped[i] || !self.mounted[i] {
                continue;
            }
            let f = self.fs[i].join("probe");
            match Command::new("sh")
                .arg("-c")
                .arg("printf x >> \"$1\" && sync \"$1\"")
                .arg("probe")
                .arg(&f)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
            {
                Ok(c) => running.push((i, c)),
                Err(e) => problems.push(format!("cannot start a probe: {e}")),
            }
        }
        let start = Instant::now();
        while !running.is_empty() {
            let mut k = 0;
            while k < running.len() {
                let (i, c) = &mut running[k];
                let i = *i;
                match c.try_wait() {
                    Ok(Some(st)) => {
                        let (_, c) = running.remove(k);
                        if !st.success() && !self.killed[i] {
                            let err = c
                                .wait_with_output()
                                .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
                                .unwrap_or_default();
                            problems.push(format!(
                                "a write + fsync to {}'s ext4 failed: {err}",
                                self.node_name(i)
                            ));
                        }
                    }
                    _ => k += 1,
                }
            }
            if start.elapsed() >= BOUND {
                for (i, c) in running.drain(..) {
                    problems.push(format!(
                        "a write + fsync to {}'s ext4 did not return within {} ms (frozen)",
                        self.node_name(i),
                        BOUND.as_millis()
                    ));
                    self.stuck.push(c);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        problems
    }

    fn max_resume_after(&self, fault_at: f64) -> Option<f64> {
        (0..NODES)
            .flat_map(|i| fault_writer::read_log(&self.logs[i]).unwrap_or_default())
            .filter(|l| matches!(l.what, What::Resume { .. }) && l.t_ms >= fault_at)
            .map(|l| l.t_ms - fault_at)
            .reduce(f64::max)
    }
}

/// Problems with the outcomes one writer's log shows: per connection and snapshot
/// it froze for, exactly one `complete`/`abort` (at most one on a connection that
/// dropped), and (when the catalog is known) `complete` only for a kept snapshot
/// and `abort` only for one that is not.
pub fn outcome_problems(
    writer: &str,
    log: &[fault_writer::LogLine],
    kept: Option<&BTreeSet<u64>>,
) -> Vec<String> {
    let mut froze: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut ended: BTreeSet<u64> = BTreeSet::new();
    for l in log {
        match &l.what {
            What::Event { event } => {
                let Some(s) = event["snapshot"].as_u64() else {
                    continue;
                };
                match event["event"].as_str() {
                    Some("freeze") => {
                        froze.entry((l.conn, s)).or_default();
                    }
                    Some(kind @ ("complete" | "abort")) => {
                        if let Some(v) = froze.get_mut(&(l.conn, s)) {
                            v.push(kind.to_string());
                        }
                    }
                    _ => {}
                }
            }
            What::Disconnected { .. } => {
                ended.insert(l.conn);
            }
            _ => {}
        }
    }
    let mut p = Vec::new();
    for ((conn, s), outcomes) in froze {
        let dropped = ended.contains(&conn);
        if outcomes.len() > 1 || (outcomes.is_empty() && !dropped) {
            p.push(format!(
                "writer {writer} got {} outcomes for snapshot {s} ({}), not exactly one",
                outcomes.len(),
                if outcomes.is_empty() {
                    "none".into()
                } else {
                    outcomes.join(", ")
                }
            ));
        }
        if let (Some(kept), Some(o)) = (kept, outcomes.first()) {
            if o == "complete" && !kept.contains(&s) {
                p.push(format!(
                    "writer {writer} was told snapshot {s} is complete, but it is not kept"
                ));
            }
            if o == "abort" && kept.contains(&s) {
                p.push(format!(
                    "writer {writer} was told snapshot {s} aborted, but it is kept"
                ));
            }
        }
    }
    p
}

/// Runs a command, failing with its stderr.
fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} exited with {}: {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits for a child at most `wait`; false if it is still running (e.g. in D state).
fn wait_bounded(c: &mut Child, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(Some(_)) | Err(_) = c.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Rig {
    /// Undoes everything without ever waiting unboundedly: a thaw can itself
    /// block when the node under the filesystem holds its I/O, and a process
    /// blocked on a frozen filesystem cannot die; stopping the daemons ends both.
    fn drop(&mut self) {
        for i in 0..NODES {
            if self.stopped[i] {
                self.signal(i, libc::SIGCONT);
            }
        }
        self.restore_links();
        let mut thaws: Vec<Child> = (0..NODES)
            .filter(|&i| self.mounted[i])
            .filter_map(|i| {
                Command::new("fsfreeze")
                    .arg("-u")
                    .arg(&self.fs[i])
                    .stderr(Stdio::null())
                    .spawn()
                    .ok()
            })
            .collect();
        for c in thaws.iter_mut() {
            wait_bounded(c, Duration::from_secs(2));
        }
        for c in self.nodes.iter_mut().flatten() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in self.nodes.iter_mut().flatten() {
            if !wait_bounded(c, Duration::from_secs(10)) {
                let _ = c.kill();
                wait_bounded(c, Duration::from_secs(2));
            }
        }
        for c in thaws
            .iter_mut()
            .chain(self.writers.iter_mut())
            .chain(self.stuck.iter_mut())
        {
            let _ = c.kill();
            wait_bounded(c, Duration::from_secs(2));
        }
        for i in 0..NODES {
            if self.mounted[i] {
                let _ = Command::new("umount").arg("-l").arg(&self.fs[i]).status();
            }
        }
        for cfg in &self.configs {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&cfg.raw.node.mount)
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fault_writer::LogLine;
    use super::*;

    #[test]
    fn the_matrix_has_every_applicable_cell_and_names_why_the_others_cannot_exist() {
        let all = all_cells();
        assert_eq!(all.len(), 2 * 5 * 5 - 12);
        assert!(Cell::parse("initiator:frozen:kill")
            .unwrap_err()
            .to_string()
            .contains("never in frozen"));
        assert!(Cell::parse("other:committing:stop").is_err());
        assert!(Cell::parse("other:frozen:slow_hook").is_err());
        assert_eq!(
            Cell::parse("other:post_snapshot:cut").unwrap(),
            Cell {
                role: Role::Other,
                phase: Phase::PostSnapshot,
                fault: Fault::Cut
            }
        );
        assert!(Cell::parse("other:frozen").is_err());
        assert!(Cell::parse("other:melting:kill").is_err());
    }

    #[test]
    fn a_seeded_subset_covers_every_fault_phase_and_role_and_is_reproducible() {
        for seed in 0..50 {
            let s = seeded_subset(seed);
            assert_eq!(s, seeded_subset(seed));
            for f in FAULTS {
                assert!(s.iter().any(|c| c.fault == f), "seed {seed} misses {f:?}");
            }
            for p in PHASES {
                assert!(s.iter().any(|c| c.phase == p), "seed {seed} misses {p:?}");
            }
            for r in ROLES {
                assert!(s.iter().any(|c| c.role == r), "seed {seed} misses {r:?}");
            }
            assert!(s.len() <= 10, "seed {seed}: {} cells", s.len());
        }
        assert_ne!(seeded_subset(1), seeded_subset(2));
    }

    fn ev(conn: u64, v: Value) -> LogLine {
        LogLine {
            t_ms: 0.0,
            conn,
            what: What::Event { event: v },
        }
    }

    #[test]
    fn outcomes_must_be_exactly_one_per_freeze_and_match_the_catalog() {
        let kept: BTreeSet<u64> = [1].into();
        let good = vec![
            ev(1, json!({"event":"freeze","snapshot":1,"lease_ms":3000})),
            ev(1, json!({"event":"thaw","snapshot":1})),
            ev(1, json!({"event":"complete","snapshot":1})),
        ];
        assert!(outcome_problems("w", &good, Some(&kept)).is_empty());
        let none = &good[..2];
        assert!(outcome_problems("w", none, Some(&kept))[0].contains("0 outcomes"));
        let mut two = good.clone();
        two.push(ev(1, json!({"event":"abort","snapshot":1,"reason":"x"})));
        let p = outcome_problems("w", &two, Some(&kept));
        assert!(p[0].contains("2 outcomes"), "{p:?}");
        let lie = outcome_problems("w", &good, Some(&BTreeSet::new()));
        assert!(lie[0].contains("not kept"), "{lie:?}");
        // A connection that dropped may have missed its outcome.
        let mut dropped = none.to_vec();
        dropped.push(LogLine {
            t_ms: 1.0,
            conn: 1,
            what: What::Disconnected {
                reason: "eof".into(),
            },
        });
        assert!(outcome_problems("w", &dropped, None).is_empty());
    }

    #[test]
    fn plans_stretch_the_phase_they_inject_into() {
        let p = Plan::of(
            Cell {
                role: Role::Initiator,
                phase: Phase::Committing,
                fault: Fault::Kill,
            },
            3000,
        );
        assert_eq!(p.failpoints[INITIATOR], vec!["create_delay_ms=1200"]);
        let p = Plan::of(
            Cell {
                role: Role::Other,
                phase: Phase::Frozen,
                fault: Fault::Stop,
            },
            3000,
        );
        assert_eq!(p.writer[INITIATOR], vec!["--delay", "freeze=1200"]);
        let p = Plan::of(
            Cell {
                role: Role::Other,
                phase: Phase::PostSnapshot,
                fault: Fault::Veto,
            },
            3000,
        );
        assert_eq!(
            p.writer[OTHER],
            vec!["--delay", "post_snapshot=1200", "--veto", "post_snapshot"]
        );
        let p = Plan::of(
            Cell {
                role: Role::Other,
                phase: Phase::Thawing,
                fault: Fault::SlowHook,
            },
            3000,
        );
        assert_eq!(p.slow_hook, Some("thaw"));
    }

    #[test]
    fn the_table_marks_every_cell() {
        let rows = vec![CellResult {
            cell: Cell {
                role: Role::Other,
                phase: Phase::Frozen,
                fault: Fault::Kill,
            },
            result: "fail".into(),
            reason: Some("x".into()),
            problems: vec!["writer w-n2 still holds writes".into()],
            faulted_snapshot: None,
            max_resume_after_fault_ms: None,
            seconds: 1.0,
        }];
        let t = table(&rows);
        assert!(t.contains("| other | frozen | **fail** | · |"), "{t}");
        assert!(
            t.contains("other:frozen:kill: writer w-n2 still holds writes"),
            "{t}"
        );
    }
}
