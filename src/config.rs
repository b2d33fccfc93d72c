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
    /// A group whose members may use the writer socket (it becomes 0660, owned by
    /// that group), for applications that run as their own user (e.g. `postgres`).
    /// Unset: the writer socket is 0600 like the control socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_group: Option<String>,
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
    /// Must be below the lease; half the lease when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_timeout: Option<String>,
    /// Time a hook script may run before it counts as a veto. Must be below the
    /// lease; half the lease when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_timeout: Option<String>,
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

/// Shortest lease: below this, one slow fsync aborts snapshots.
pub const MIN_LEASE_MS: u64 = 1_000;
/// Longest lease: applications stay frozen at most this long when a node dies.
pub const MAX_LEASE_MS: u64 = 600_000;

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
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&lease_ms) {
            bail!(
                "{}: [cluster] lease = {:?} is outside 1s..10m: a frozen node aborts by itself \
                 after the lease, so it must leave time to freeze and be short enough that \
                 applications do not stay frozen for long",
                path.display(),
                raw.cluster.lease
            );
        }
        let below_lease = |key: &str, given: &Option<String>| -> Result<u64> {
            let Some(text) = given else {
                return Ok(lease_ms / 2);
            };
            let ms = parse_ms(text).with_context(|| ctx(key))?;
            if ms == 0 || ms >= lease_ms {
                bail!(
                    "{}: [cluster] {key} = {text:?} must be above 0 and below the lease ({}): \
                     a node gives up on its own after the lease, so a longer {key} could never \
                     be waited for",
                    path.display(),
                    raw.cluster.lease
                );
            }
            Ok(ms)
        };
        let writer_timeout_ms = below_lease("writer_timeout", &raw.cluster.writer_timeout)?;
        let hook_timeout_ms = below_lease("hook_timeout", &raw.cluster.hook_timeout)?;
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
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!(
                "{}: [cluster] members lists the node name {:?} twice",
                path.display(),
                w[0]
            );
        }
        let mut addrs: Vec<SocketAddr> = raw.cluster.members.iter().map(|m| m.addr).collect();
        addrs.sort_unstable();
        if let Some(w) = addrs.windows(2).find(|w| w[0] == w[1]) {
            bail!(
                "{}: [cluster] members lists the address {} twice",
                path.display(),
                w[0]
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

    /// The checks `node run` makes before it touches anything, on top of those of
    /// [`NodeConfig::load`]: every configured path exists (the mount point and the run
    /// directory may be missing if their parent exists: the daemon creates that last
    /// level), the node's certificate carries this node's name and its key belongs to
    /// it, and `writer_group` names an existing group. Errors name the key and file.
    pub fn check_for_run(&self) -> Result<RunChecks> {
        let file = self.file.display();
        let must_exist = |key: &str, p: &Path| -> Result<()> {
            if !p.exists() {
                bail!("{file}: {key} = {} does not exist", p.display());
            }
            Ok(())
        };
        let n = &self.raw.node;
        if let Some(h) = &n.hooks_dir {
            must_exist("[node] hooks_dir", h)?;
        }
        must_exist("[cluster] ca_cert", &self.raw.cluster.ca_cert)?;
        must_exist("[tls] cert", &self.raw.tls.cert)?;
        must_exist("[tls] key", &self.raw.tls.key)?;
        must_exist("[volume] path", &self.raw.volume.path)?;
        for (key, p) in [("[node] mount", &n.mount), ("[node] run_dir", &n.run_dir)] {
            if !p.exists() && !p.parent().is_some_and(Path::is_dir) {
                bail!(
                    "{file}: {key} = {} does not exist and neither does its parent \
                     (the daemon creates only the last level)",
                    p.display()
                );
            }
        }
        let id =
            freezeframe_netproto::pki::NodeIdentity::load(&self.raw.tls.cert, &self.raw.tls.key)
                .with_context(|| format!("{file}: [tls] cert/key"))?;
        if id.node_name != n.name {
            bail!(
                "{file}: the certificate {} is for node {:?}, but this node is named {:?} \
                 ([node] name); peers would refuse it — use the certificate issued for {:?}",
                self.raw.tls.cert.display(),
                id.node_name,
                n.name,
                n.name
            );
        }
        let writer_gid = match &n.writer_group {
            None => None,
            Some(g) => Some(group_id(g).with_context(|| format!("{file}: [node] writer_group"))?),
        };
        Ok(RunChecks { writer_gid })
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

/// What [`NodeConfig::check_for_run`] resolved.
#[derive(Debug, Clone, Copy)]
pub struct RunChecks {
    /// The gid of `[node] writer_group`, if set.
    pub writer_gid: Option<u32>,
}

/// The gid of group `name`; an error naming it if there is no such group.
pub fn group_id(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| anyhow::anyhow!("group name {name:?} contains a NUL byte"))?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it; getgrnam_r is the
    // thread-safe lookup and writes only into grp and buf.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 {
        bail!(
            "cannot look up group {name:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    if out.is_null() {
        bail!("group {name:?} does not exist (create it, or remove writer_group)");
    }
    Ok(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: libc::group is a plain C struct of integers and pointers; all-zero is a
    // valid (empty) value that getgrnam_r overwrites.
    unsafe { std::mem::zeroed() }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A real three-node cluster folder; returns (tempdir, n1's node.toml).
    fn cluster() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let c = d.path().join("c");
        crate::cluster::init(
            &c,
            &crate::cluster::InitOptions {
                nodes: 3,
                size: 1 << 20,
                block_size: 65536,
                lease: "4s".into(),
            },
        )
        .expect("cluster init");
        (d, c.join("nodes/n1/node.toml"))
    }

    /// Loads n1's config after `edit` changed its text; returns the error text.
    fn refused(edit: impl FnOnce(String) -> String) -> String {
        let (_d, path) = cluster();
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, edit(text)).expect("write");
        let r = NodeConfig::load(&path).and_then(|c| c.check_for_run().map(|_| c));
        format!("{:#}", r.expect_err("must be refused"))
    }

    #[test]
    fn a_fresh_cluster_config_passes_and_timeouts_default_to_half_the_lease() {
        let (_d, path) = cluster();
        let cfg = NodeConfig::load(&path).expect("load");
        cfg.check_for_run().expect("checks");
        assert_eq!(cfg.lease_ms, 4000);
        assert_eq!(cfg.writer_timeout_ms, 2000);
        assert_eq!(cfg.hook_timeout_ms, 2000);
    }

    #[test]
    fn a_lease_outside_one_second_to_ten_minutes_is_refused() {
        for lease in ["0s", "999ms", "11m"] {
            let err = refused(|t| t.replace("lease = \"4s\"", &format!("lease = \"{lease}\"")));
            assert!(
                err.contains("lease") && err.contains("outside 1s..10m"),
                "{lease}: {err}"
            );
        }
    }

    #[test]
    fn writer_and_hook_timeouts_at_or_above_the_lease_are_refused_by_key() {
        for key in ["writer_timeout", "hook_timeout"] {
            let err = refused(|t| {
                t.replace("lease = \"4s\"", &format!("lease = \"4s\"\n{key} = \"4s\""))
            });
            assert!(
                err.contains(&format!("[cluster] {key}")) && err.contains("below the lease"),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicate_member_names_and_addresses_are_refused() {
        let err = refused(|t| t.replace("name = \"n3\"", "name = \"n2\""));
        assert!(err.contains("node name \"n2\" twice"), "{err}");
        let err = refused(|t| {
            let addr = |n: &str| {
                let at = t.find(&format!("name = \"{n}\"\naddr = ")).expect("member") + 19;
                t[at..].split('"').nth(1).expect("addr").to_string()
            };
            let (a2, a3) = (addr("n2"), addr("n3"));
            t.replace(&a3, &a2)
        });
        assert!(err.contains("address") && err.contains("twice"), "{err}");
    }

    #[test]
    fn a_certificate_for_another_node_is_refused() {
        let err = refused(|t| {
            t.replace("cert = \"node.pem\"", "cert = \"../n2/node.pem\"")
                .replace("key = \"node.key\"", "key = \"../n2/node.key\"")
        });
        assert!(
            err.contains("is for node \"n2\"") && err.contains("named \"n1\""),
            "{err}"
        );
    }

    #[test]
    fn missing_paths_are_refused_naming_the_key() {
        let err = refused(|t| t.replace("hooks_dir = \"hooks.d\"", "hooks_dir = \"nope.d\""));
        assert!(
            err.contains("[node] hooks_dir") && err.contains("does not exist"),
            "{err}"
        );
        let err = refused(|t| t.replace("../../ca.pem", "../../missing.pem"));
        assert!(err.contains("[cluster] ca_cert"), "{err}");
        let err = refused(|t| t.replace("../../shared/volume.img", "../../shared/other.img"));
        assert!(err.contains("[volume] path"), "{err}");
        let err = refused(|t| t.replace("mount = \"mnt\"", "mount = \"no/such/mnt\""));
        assert!(
            err.contains("[node] mount") && err.contains("parent"),
            "{err}"
        );
    }

    #[test]
    fn a_writer_group_that_does_not_exist_is_refused_by_name() {
        let err = refused(|t| {
            t.replace(
                "allow_other = false",
                "allow_other = false\nwriter_group = \"ff-no-such-group\"",
            )
        });
        assert!(
            err.contains("writer_group")
                && err.contains("ff-no-such-group")
                && err.contains("does not exist"),
            "{err}"
        );
        assert_eq!(group_id("root").expect("root group"), 0);
    }
}
