//! `node.toml`: what one node needs to know to run.
//!
//! The same file serves a local test cluster (`cluster init`) and a real
//! multi-host cluster (see `assets/node.toml`). Relative paths are taken
//! relative to the directory holding the file, so a cluster folder can be
//! moved as a whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The file as written on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub node: NodeSection,
    pub volume: VolumeSection,
    pub cluster: ClusterSection,
    pub tls: TlsSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's name; must be one of `cluster.members` and the name in its certificate.
    pub name: String,
    /// QUIC address this node listens on for its peers.
    pub listen: SocketAddr,
    /// Holds `control.sock`, `writer.sock`, the pid file and the log.
    pub run_dir: PathBuf,
    /// Where the FUSE tree (`live/`, `snapshots/`) is mounted.
    pub mount: PathBuf,
    /// Freeze/thaw scripts, run in lexical order on freeze, reverse on thaw.
    #[serde(default)]
    pub hooks_dir: Option<PathBuf>,
    /// Allow users other than the daemon's to use the mount (needs `user_allow_other`
    /// in /etc/fuse.conf when not root).
    #[serde(default)]
    pub allow_other: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
    /// The shared volume (image file or block device) on shared storage.
    pub path: PathBuf,
    /// Largest diff area a snapshot may grow to before it is marked invalid.
    #[serde(default)]
    pub diff_limit: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    /// The cluster CA certificate (PEM); only peers it signed are accepted.
    pub ca_cert: PathBuf,
    /// How long a node stays frozen without hearing the initiator's post-snapshot.
    #[serde(default = "default_lease")]
    pub lease: String,
    /// Default time a writer has to answer freeze (a writer may ask for another).
    #[serde(default = "default_writer_timeout")]
    pub writer_timeout: String,
    /// Time a hook script may run before it counts as a veto.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: String,
    /// Treat a node whose attachment was not renewed for two leases as fenced
    /// (it stopped writing by itself after one). Off: an operator must run
    /// `freezeframe node fence NAME` before snapshots go on without it.
    #[serde(default)]
    pub auto_fence: bool,
    pub members: Vec<Member>,
}

fn default_lease() -> String {
    "10s".into()
}
fn default_writer_timeout() -> String {
    "10s".into()
}
fn default_hook_timeout() -> String {
    "30s".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A loaded and checked node configuration with absolute paths.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub file: PathBuf,
    pub raw: NodeFile,
    pub lease_ms: u64,
    pub writer_timeout_ms: u64,
    pub hook_timeout_ms: u64,
    pub diff_limit: Option<u64>,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read node config {}", path.display()))?;
        let mut raw: NodeFile = toml::from_str(&text)
            .with_context(|| format!("node config {} is not valid", path.display()))?;
        let base = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut raw.node.run_dir);
        abs(&mut raw.node.mount);
        if let Some(h) = raw.node.hooks_dir.as_mut() {
            abs(h);
        }
        abs(&mut raw.volume.path);
        abs(&mut raw.cluster.ca_cert);
        abs(&mut raw.tls.cert);
        abs(&mut raw.tls.key);

        let ctx = |what: &str| format!("{}: [cluster] {what}", path.display());
        let lease_ms = parse_ms(&raw.cluster.lease).with_context(|| ctx("lease"))?;
        let writer_timeout_ms =
            parse_ms(&raw.cluster.writer_timeout).with_context(|| ctx("writer_timeout"))?;
        let hook_timeout_ms =
            parse_ms(&raw.cluster.hook_timeout).with_context(|| ctx("hook_timeout"))?;
        let diff_limit = match &raw.volume.diff_limit {
            Some(s) => Some(
                freezeframe_core::units::parse_size(s)
                    .with_context(|| format!("{}: [volume] diff_limit", path.display()))?,
            ),
            None => None,
        };
        if !raw.cluster.members.iter().any(|m| m.name == raw.node.name) {
            bail!(
                "{}: node name {:?} is not in [cluster] members ({})",
                path.display(),
                raw.node.name,
                raw.cluster
                    .members
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut names: Vec<&str> = raw
            .cluster
            .members
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            bail!(
                "{}: [cluster] members lists a node name twice",
                path.display()
            );
        }
        Ok(NodeConfig {
            file: path.to_path_buf(),
            raw,
            lease_ms,
            writer_timeout_ms,
            hook_timeout_ms,
            diff_limit,
        })
    }

    pub fn name(&self) -> &str {
        &self.raw.node.name
    }
    pub fn control_socket(&self) -> PathBuf {
        self.raw.node.run_dir.join("control.sock")
    }
    pub fn writer_socket(&self) -> PathBuf {
        self.raw.node.run_dir.join("writer.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.raw.node.run_dir.join("node.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.raw.node.run_dir.join("node.log")
    }
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.raw
            .cluster
            .members
            .iter()
            .filter(move |m| m.name != self.raw.node.name)
    }
    /// Path of a snapshot's image on this node's mount.
    pub fn snapshot_image_path(&self, id: u64) -> PathBuf {
        self.raw
            .node
            .mount
            .join("snapshots")
            .join(id.to_string())
            .join("volume.img")
    }
}

/// Milliseconds from "10s", "500ms", "2m" or a bare number of milliseconds.
pub fn parse_ms(s: &str) -> Result<u64> {
    Ok(freezeframe_core::units::parse_duration(s)?.as_millis() as u64)
}

/// The node config to use for a client command: `--config`, `FREEZEFRAME_CONFIG`,
/// or the only node under `./nodes/` — otherwise a clear error.
pub fn resolve(config: Option<&Path>) -> Result<NodeConfig> {
    match config {
        Some(p) => NodeConfig::load(p),
        None => bail!(
            "no node selected: pass --config DIR/nodes/NAME/node.toml or set FREEZEFRAME_CONFIG"
        ),
    }
}
