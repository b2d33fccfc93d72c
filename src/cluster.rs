//! `freezeframe cluster init|up|down`: a whole cluster on one host.
//!
//! `init` lays out a folder that holds everything a cluster needs — the shared
//! volume and its state directory, the cluster CA, and one folder per node
//! with its `node.toml`, certificate, key, run directory, hooks and mount
//! point. `up` starts each node as its own `freezeframe node run` process and
//! waits until the QUIC mesh is connected; `down` stops them with SIGTERM and
//! waits for their mounts to go away.
//!
//! ```text
//! DIR/
//!   cluster.toml          name, members (what `up`/`down` iterate)
//!   ca.pem  ca.key        the cluster CA (keep ca.key off the nodes in production)
//!   shared/volume.img     the shared volume
//!   shared/volume.img.ffstate/   its catalog and diff area
//!   nodes/n1/node.toml node.pem node.key run/ mnt/ hooks.d/
//! ```

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{
    ClusterSection, Member, NodeConfig, NodeFile, NodeSection, TlsSection, VolumeSection,
};

/// `DIR/cluster.toml`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub name: String,
    pub nodes: Vec<String>,
}

pub struct InitOptions {
    pub nodes: usize,
    /// Node names (`--names db1,db2,db3`); `None`: n1..nN.
    pub names: Option<Vec<String>>,
    pub size: u64,
    pub block_size: u32,
    pub lease: String,
}

/// Creates the cluster folder. Refuses a folder that already holds a cluster.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<Vec<PathBuf>> {
    if opts.nodes == 0 || opts.nodes > 64 {
        bail!("--nodes must be between 1 and 64, not {}", opts.nodes);
    }
    if let Some(names) = &opts.names {
        if names.is_empty() || names.len() > 64 {
            bail!("--names must list 1 to 64 node names");
        }
        for (i, n) in names.iter().enumerate() {
            freezeframe_netproto::pki::validate_node_name(n)
                .with_context(|| format!("--names: {n:?} cannot be a node name"))?;
            if names[..i].contains(n) {
                bail!("--names lists {n} twice");
            }
        }
    }
    if dir.join("cluster.toml").exists() {
        bail!(
            "{} already holds a cluster (cluster.toml exists); pick another DIR",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir.join("shared"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let cluster_name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "freezeframe".into());

    let volume_path = dir.join("shared/volume.img");
    freezeframe_core::volume::Volume::create(&volume_path, opts.size, opts.block_size, None)
        .with_context(|| format!("creating the shared volume {}", volume_path.display()))?;

    let ca = freezeframe_netproto::pki::ClusterCa::generate(&cluster_name)?;
    ca.save(&dir.join("ca.pem"), &dir.join("ca.key"))?;

    let names: Vec<String> = match &opts.names {
        Some(names) => names.clone(),
        None => (1..=opts.nodes).map(|i| format!("n{i}")).collect(),
    };
    let members: Vec<Member> = names
        .iter()
        .map(|n| {
            Ok(Member {
                name: n.clone(),
                addr: free_loopback_port()?,
            })
        })
        .collect::<Result<_>>()?;

    let mut configs = Vec::new();
    for m in &members {
        let nd = dir.join("nodes").join(&m.name);
        for sub in ["run", "mnt", "hooks.d"] {
            std::fs::create_dir_all(nd.join(sub))?;
        }
        let id = ca.issue_node(&m.name, &[m.addr.ip().to_string()])?;
        id.save(&nd.join("node.pem"), &nd.join("node.key"))?;
        let file = NodeFile {
            node: NodeSection {
                name: m.name.clone(),
                listen: m.addr,
                run_dir: "run".into(),
                mount: "mnt".into(),
                hooks_dir: Some("hooks.d".into()),
                allow_other: false,
                writer_group: None,
            },
            volume: VolumeSection {
                path: "../../shared/volume.img".into(),
                diff_limit: None,
                state: Some("../../shared/volume.img.ffstate".into()),
            },
            cluster: ClusterSection {
                name: cluster_name.clone(),
                ca_cert: "../../ca.pem".into(),
                lease: opts.lease.clone(),
                // Both default to half the lease.
                writer_timeout: None,
                hook_timeout: None,
                auto_fence: false,
                members: members.clone(),
            },
            tls: TlsSection {
                cert: "node.pem".into(),
                key: "node.key".into(),
            },
        };
        let path = nd.join("node.toml");
        std::fs::write(&path, toml::to_string_pretty(&file)?)?;
        configs.push(path);
    }
    let cf = ClusterFile {
        name: cluster_name,
        nodes: names,
    };
    std::fs::write(dir.join("cluster.toml"), toml::to_string_pretty(&cf)?)?;
    Ok(configs)
}

/// A UDP port on 127.0.0.1 that is free right now.
fn free_loopback_port() -> Result<SocketAddr> {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free UDP port")?;
    Ok(s.local_addr()?)
}

pub fn load(dir: &Path) -> Result<(ClusterFile, Vec<NodeConfig>)> {
    let path = dir.join("cluster.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a cluster folder (no cluster.toml)",
            dir.display()
        )
    })?;
    let cf: ClusterFile =
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
    let configs = cf
        .nodes
        .iter()
        .map(|n| NodeConfig::load(&dir.join("nodes").join(n).join("node.toml")))
        .collect::<Result<_>>()?;
    Ok((cf, configs))
}

/// Pid of the node's daemon if it is running.
pub fn running_pid(cfg: &NodeConfig) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(cfg.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive.then_some(pid)
}

/// Starts every node in the background and waits until each sees all its peers.
pub fn up(dir: &Path, wait: Duration) -> Result<()> {
    let (_, configs) = load(dir)?;
    let exe = std::env::current_exe()?;
    for cfg in &configs {
        if let Some(pid) = running_pid(cfg) {
            eprintln!("{}: already running (pid {pid})", cfg.name());
            continue;
        }
        start_node(&exe, cfg)?;
    }
    let deadline = Instant::now() + wait;
    for cfg in &configs {
        wait_connected(cfg, deadline)?;
    }
    Ok(())
}

/// Spawns `freezeframe node run --config FILE` detached, logging to run/node.log.
pub fn start_node(exe: &Path, cfg: &NodeConfig) -> Result<std::process::Child> {
    start_node_with_env(exe, cfg, &[])
}

/// [`start_node`] with extra environment variables (e.g. `FREEZEFRAME_FAILPOINTS`).
pub fn start_node_with_env(
    exe: &Path,
    cfg: &NodeConfig,
    env: &[(&str, &str)],
) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.log_file())
        .with_context(|| format!("cannot open {}", cfg.log_file().display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("node")
        .arg("run")
        .arg("--config")
        .arg(&cfg.file)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .envs(env.iter().copied())
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting node {}", cfg.name()))?;
    Ok(child)
}

/// Polls the node's status until all peers are connected or the deadline passes.
pub fn wait_connected(cfg: &NodeConfig, deadline: Instant) -> Result<()> {
    let want = cfg.peers().count();
    let mut last_err = String::from("no answer yet");
    while Instant::now() < deadline {
        match crate::client::call_blocking(
            cfg,
            &freezeframe_netproto::control::ControlRequest::Status,
        ) {
            Ok(v) => {
                let connected = v["peers"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|p| p["connected"].as_bool() == Some(true))
                            .count()
                    })
                    .unwrap_or(0);
                let mounted = v["mounted"].as_bool().unwrap_or(false);
                if connected == want && mounted {
                    return Ok(());
                }
                last_err = format!("{connected} of {want} peers connected, mounted: {mounted}");
            }
            Err(e) => last_err = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "node {} did not come up: {last_err} (see {})",
        cfg.name(),
        cfg.log_file().display()
    )
}

/// Stops every running node with SIGTERM and waits for it to exit.
pub fn down(dir: &Path, wait: Duration) -> Result<()> {
    let (_, configs) = load(dir)?;
    let mut pids = Vec::new();
    for cfg in &configs {
        if let Some(pid) = running_pid(cfg) {
            // SAFETY: sending a signal to a pid we started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            pids.push((cfg, pid));
        }
    }
    let deadline = Instant::now() + wait;
    for (cfg, pid) in pids {
        // SAFETY: signal 0 probes for existence.
        while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        if unsafe { libc::kill(pid, 0) } == 0 {
            eprintln!("{}: did not stop in time, sending SIGKILL", cfg.name());
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = freezeframe_fusefs::clear_stale_mount(&cfg.raw.node.mount);
        }
    }
    Ok(())
}

/// `cluster issue`: a certificate for a new node from an existing cluster CA.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    addr: std::net::SocketAddr,
    out: &Path,
) -> Result<(PathBuf, PathBuf)> {
    freezeframe_netproto::pki::validate_node_name(name)
        .with_context(|| format!("{name:?} cannot be a node name"))?;
    let (cert, key) = (ca_dir.join("ca.pem"), ca_dir.join("ca.key"));
    let ca = freezeframe_netproto::pki::ClusterCa::load(&cert, &key).with_context(|| {
        format!(
            "loading the cluster CA from {} and {} (the key stays where the cluster was initialised)",
            cert.display(),
            key.display()
        )
    })?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (pem, keyf) = (out.join("node.pem"), out.join("node.key"));
    if pem.exists() || keyf.exists() {
        bail!(
            "{} already holds a node identity; remove it or pick another --out",
            out.display()
        );
    }
    let id = ca.issue_node(name, &[addr.ip().to_string()])?;
    id.save(&pem, &keyf)?;
    Ok((pem, keyf))
}
