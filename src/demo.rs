//! `freezeframe demo`: the whole story on this machine in one command.
//!
//! 1. a local cluster (as `cluster init`) in a temporary folder, its nodes started;
//! 2. a demo application on every node ([`crate::demo_writer`]) writing records
//!    into its own region of the live volume through its node's mount;
//! 3. snapshots initiated from each node in turn while the applications write,
//!    every phase of every node shown as it happens;
//! 4. every snapshot checked on every node's mount: each application's region
//!    holds exactly the records it had when it acknowledged freeze;
//! 5. the snapshots backed up (full, then changed blocks only) and the last
//!    one restored and compared bit-exact with the snapshot;
//! 6. everything stopped and removed (unless `--keep`).
//!
//! Exit code 0 only when every check passed. Ctrl-C stops the nodes and
//! unmounts at any moment.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use freezeframe_netproto::control::{ControlClient, ControlRequest};
use serde_json::Value;

use crate::cluster;
use crate::config::NodeConfig;
use crate::demo_writer;

pub struct DemoOptions {
    pub nodes: usize,
    pub dir: Option<PathBuf>,
    pub keep: bool,
    pub console: bool,
    pub snapshots: usize,
}

/// Size of each application's region, and the distance between regions.
const REGION: u64 = 4 << 20;
const STRIDE: u64 = 16 << 20;

/// Makes sure `fusermount3` exists: installs fuse3 as root with apt-get, or
/// says in one line what to install.
pub fn ensure_fuse() -> Result<()> {
    if which("fusermount3") {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && which("apt-get") {
        eprintln!("installing fuse3 (needed for the FUSE mounts)…");
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null")
            .status()?
            .success();
        if ok && which("fusermount3") {
            return Ok(());
        }
    }
    bail!("freezeframe needs fusermount3: apt-get install -y fuse3")
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// What runs, so every exit path can stop it.
struct Running {
    nodes: Vec<(NodeConfig, Child)>,
    writers: Vec<Child>,
}

impl Running {
    fn stop(&mut self) {
        for w in &mut self.writers {
            let _ = w.kill();
            let _ = w.wait();
        }
        self.writers.clear();
        for (cfg, child) in &mut self.nodes {
            // SAFETY: signalling a child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        let _ = freezeframe_fusefs::clear_stale_mount(&cfg.raw.node.mount);
                        break;
                    }
                }
            }
        }
        self.nodes.clear();
    }
}

pub fn run(opts: DemoOptions) -> Result<bool> {
    ensure_fuse()?;
    let (dir, temp) = match &opts.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("freezeframe-demo-")
                .tempdir_in(std::env::temp_dir())?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let running = Arc::new(Mutex::new(Running {
        nodes: Vec::new(),
        writers: Vec::new(),
    }));
    let interrupted = Arc::new(AtomicBool::new(false));
    install_ctrl_c(
        running.clone(),
        interrupted.clone(),
        if opts.keep { None } else { Some(dir.clone()) },
    );

    let result = story(&opts, &dir, &running, &interrupted);
    let keep_running = opts.keep && result.is_ok();
    if !keep_running {
        running.lock().unwrap_or_else(|e| e.into_inner()).stop();
    }
    match (&result, keep_running) {
        (_, true) => {
            let guard = running.lock().unwrap_or_else(|e| e.into_inner());
            println!("\nThe cluster keeps running (--keep). Browse the snapshots:");
            for (cfg, _) in &guard.nodes {
                println!("  {}", cfg.raw.node.mount.join("snapshots").display());
            }
            println!("Stop it with: freezeframe cluster down {}", dir.display());
            // Leave the children running: forget the handles on purpose.
            drop(guard);
            if let Some(t) = temp {
                let _ = t.keep();
            }
        }
        (_, false) => {
            if let Some(t) = temp {
                t.close().context("removing the demo folder")?;
            }
        }
    }
    result
}

fn install_ctrl_c(running: Arc<Mutex<Running>>, flag: Arc<AtomicBool>, remove: Option<PathBuf>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
                eprintln!("\ninterrupted: stopping the nodes and unmounting…");
                running.lock().unwrap_or_else(|e| e.into_inner()).stop();
                if let Some(d) = remove {
                    let _ = std::fs::remove_dir_all(d);
                }
                std::process::exit(130);
            }
        });
    });
}

fn story(
    opts: &DemoOptions,
    dir: &Path,
    running: &Arc<Mutex<Running>>,
    interrupted: &AtomicBool,
) -> Result<bool> {
    println!(
        "freezeframe demo: {} nodes sharing one volume, in {}",
        opts.nodes,
        dir.display()
    );
    let configs = cluster::init(
        dir,
        &cluster::InitOptions {
            names: None,
            nodes: opts.nodes,
            size: 256 << 20,
            block_size: 64 << 10,
            lease: "10s".into(),
        },
    )?;
    let configs: Vec<NodeConfig> = configs
        .iter()
        .map(|p| NodeConfig::load(p))
        .collect::<Result<_>>()?;

    // 1. Nodes.
    let exe = std::env::current_exe()?;
    for cfg in &configs {
        let child = cluster::start_node(&exe, cfg)?;
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .push((cfg.clone(), child));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for cfg in &configs {
        cluster::wait_connected(cfg, deadline)?;
    }
    println!("nodes up, QUIC mesh connected, volume mounted on every node");

    // 2. Applications.
    let mut apps = Vec::new();
    for (i, cfg) in configs.iter().enumerate() {
        let name = format!("app-{}", cfg.name());
        let log = cfg.raw.node.run_dir.join(format!("{name}.freeze.log"));
        let child = std::process::Command::new(&exe)
            .args(["demo-writer", "--name", &name])
            .arg("--socket")
            .arg(cfg.writer_socket())
            .arg("--volume")
            .arg(cfg.raw.node.mount.join("live/volume.img"))
            .arg("--offset")
            .arg((i as u64 * STRIDE).to_string())
            .arg("--len")
            .arg(REGION.to_string())
            .arg("--log")
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting a demo application")?;
        running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writers
            .push(child);
        apps.push(App {
            name,
            offset: i as u64 * STRIDE,
            log,
        });
    }
    wait_writers(&configs, Duration::from_secs(10))?;
    println!("an application on every node registered as a writer and is writing records\n");
    if opts.console {
        let cfg = configs[0].file.clone();
        std::process::Command::new(&exe)
            .arg("console")
            .arg("--config")
            .arg(cfg)
            .spawn()?;
    }

    // Live phase view from every node's event stream.
    // Any node's stream carries every node's phase events: one subscription is enough.
    let view = EventView::start(&configs[..1]);

    // 3. Snapshots, initiated from each node in turn.
    let mut taken = Vec::new();
    for k in 0..opts.snapshots {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(700));
        let cfg = &configs[k % configs.len()];
        println!("── snapshot requested on {} ──", cfg.name());
        let report = crate::client::call_blocking(
            cfg,
            &ControlRequest::SnapshotCreate { timeout_ms: None },
        )?;
        std::thread::sleep(Duration::from_millis(100));
        view.flush();
        let status = report["status"].as_str().unwrap_or("?");
        if status != "complete" {
            bail!("snapshot failed: {}", report["error"]);
        }
        println!(
            "── snapshot {} complete: freeze window {} ms, initiator I/O held {} ms ──\n",
            report["id"], report["freeze_window_ms"], report["io_hold_ms"]
        );
        taken.push(report);
    }
    view.stop();

    // 4. Checks on every node's mount.
    println!(
        "{:<9} {:<6} {:<10} {:>8} {:>8}  {:<11} {:>14}",
        "SNAPSHOT", "NODE", "APP", "FROZEN", "FOUND", "CONSISTENT", "FREEZE WINDOW"
    );
    let mut all_ok = true;
    for report in &taken {
        let id = report["id"].as_u64().unwrap_or(0);
        for cfg in &configs {
            let image = cfg.snapshot_image_path(id);
            for app in &apps {
                let counts = demo_writer::read_freeze_log(&app.log)?;
                let want = counts.get(&id).copied();
                let got = demo_writer::check_region(&image, app.offset, REGION, &app.name)?;
                let ok = want == Some(got.records) && got.problem.is_none();
                all_ok &= ok;
                println!(
                    "{:<9} {:<6} {:<10} {:>8} {:>8}  {:<11} {:>11} ms{}",
                    id,
                    cfg.name(),
                    app.name,
                    want.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
                    got.records,
                    if ok { "yes" } else { "NO" },
                    report["freeze_window_ms"],
                    got.problem.map(|p| format!("  ({p})")).unwrap_or_default()
                );
            }
        }
    }
    println!();
    // 5. Backups: full, then changed blocks only; restore one and compare.
    let ids: Vec<u64> = taken.iter().filter_map(|r| r["id"].as_u64()).collect();
    all_ok &= backups(dir, &configs[0], &ids)?;
    println!();
    if all_ok {
        println!(
            "verdict: every snapshot is application-consistent for every application on every node"
        );
    } else {
        println!("verdict: INCONSISTENT snapshots found (see the rows marked NO)");
    }
    Ok(all_ok)
}

/// Backs every snapshot up (the first full, the others express-full), restores
/// the last one and checks it bit-exact against the snapshot on the mount.
fn backups(dir: &Path, cfg: &NodeConfig, ids: &[u64]) -> Result<bool> {
    use freezeframe_core::backup::{
        NoProgress, Repository, VolumeSnapshotSource, DEFAULT_PACK_SIZE,
    };
    let Some(&last) = ids.last() else {
        return Ok(true);
    };
    let repo_path = dir.join("backups");
    let repo = Repository::init(&repo_path, DEFAULT_PACK_SIZE)?;
    let volume = cfg.open_volume()?;
    println!(
        "{:<9} {:<14} {:>12} {:>12} {:>10}",
        "SNAPSHOT", "BACKUP", "BLOCKS READ", "STORED", "TIME"
    );
    let mut last_backup = String::new();
    for &id in ids {
        let m = repo.backup(&VolumeSnapshotSource::new(&volume, Some(id))?, &NoProgress)?;
        let kind = if m.header.stats.blocks_read == m.header.stats.blocks_total {
            "full"
        } else {
            "changed only"
        };
        println!(
            "{:<9} {:<14} {:>12} {:>12} {:>7} ms",
            id,
            kind,
            m.header.stats.blocks_read,
            crate::human_bytes(m.header.stats.bytes_stored),
            m.header.stats.duration_ms
        );
        last_backup = m.header.id.clone();
    }
    let restored = dir.join("restored.img");
    repo.restore(&last_backup, &restored, &NoProgress)?;
    let want = hash_path(&cfg.snapshot_image_path(last))?;
    let got = hash_path(&restored)?;
    let ok = want == got;
    println!(
        "restore of backup {last_backup} (snapshot {last}): {}",
        if ok {
            "bit-exact"
        } else {
            "DIFFERENT from the snapshot"
        }
    );
    let _ = std::fs::remove_file(&restored);
    Ok(ok)
}

fn hash_path(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().to_hex().to_string())
}

struct App {
    name: String,
    offset: u64,
    log: PathBuf,
}

fn wait_writers(configs: &[NodeConfig], wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    for cfg in configs {
        loop {
            let v = crate::client::call_blocking(cfg, &ControlRequest::Status)?;
            if v["writers"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|w| w["name"].as_str().is_some_and(|n| n.starts_with("app-")))
            }) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the demo application on {} did not register", cfg.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Prints phase events of every node as they arrive.
struct EventView {
    stop: Arc<AtomicBool>,
    lines: Arc<Mutex<Vec<String>>>,
    tty: bool,
}

impl EventView {
    fn start(configs: &[NodeConfig]) -> EventView {
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let tty = std::io::stdout().is_terminal();
        for cfg in configs {
            let (path, stop, lines) = (cfg.control_socket(), stop.clone(), lines.clone());
            std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let Ok(mut c) = ControlClient::connect(&path).await else {
                        return;
                    };
                    if c.subscribe().await.is_err() {
                        return;
                    }
                    while !stop.load(Ordering::SeqCst) {
                        match c.next_event().await {
                            Ok(Some(ev)) => {
                                let line = format_event(&ev, tty);
                                if !line.is_empty() {
                                    println!("{line}");
                                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                                }
                            }
                            _ => return,
                        }
                    }
                });
            });
        }
        EventView { stop, lines, tty }
    }
    fn flush(&self) {
        let _ = std::io::stdout().flush();
        let _ = self.tty;
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn format_event(ev: &Value, tty: bool) -> String {
    if ev["writer"].is_string() {
        return String::new();
    }
    let phase = ev["phase"].as_str().unwrap_or("?");
    let edge = ev["edge"].as_str().unwrap_or("");
    if edge != "enter" {
        return String::new();
    }
    let (on, off) = if tty {
        let c = match phase {
            "freezing" => "\x1b[34m",
            "frozen" => "\x1b[36m",
            "committing" => "\x1b[35m",
            "post_snapshot" => "\x1b[33m",
            "thawing" => "\x1b[32m",
            "done" => "\x1b[1;32m",
            "aborted" => "\x1b[1;31m",
            _ => "",
        };
        (c, "\x1b[0m")
    } else {
        ("", "")
    };
    format!(
        "  {}  {:<4} → {on}{phase}{off}",
        crate::client::fmt_time(ev["at_ms"].as_u64().unwrap_or(0)),
        ev["node"].as_str().unwrap_or("?")
    )
}
