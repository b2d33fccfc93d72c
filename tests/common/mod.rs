//! Helpers that keep each end-to-end scenario a few lines: a local cluster of
//! real `freezeframe node run` processes with real FUSE mounts and QUIC on
//! loopback, stopped and cleaned up when the test ends, whatever happens.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_freezeframe"))
}

/// Runs the binary and returns its output (never panics on a non-zero exit).
pub fn ff(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run freezeframe")
}

/// Runs the binary, asserts success, returns stdout parsed as JSON.
pub fn ff_json(args: &[&str]) -> Value {
    let out = ff(args);
    assert!(
        out.status.success(),
        "freezeframe {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "freezeframe {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn fuse_available() -> bool {
    Path::new("/dev/fuse").exists()
        && std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()))
            .unwrap_or(false)
}

/// A cluster of real node processes. Dropping it stops them and unmounts.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub writers: Vec<Child>,
}

pub struct Node {
    pub name: String,
    pub config: PathBuf,
    pub child: Option<Child>,
}

impl Node {
    pub fn dir(&self) -> PathBuf {
        self.config.parent().expect("node dir").to_path_buf()
    }
    pub fn mount(&self) -> PathBuf {
        self.dir().join("mnt")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir().join("run")
    }
    pub fn live(&self) -> PathBuf {
        self.mount().join("live/volume.img")
    }
    pub fn snapshot_image(&self, id: u64) -> PathBuf {
        self.mount().join(format!("snapshots/{id}/volume.img"))
    }
    pub fn cfg(&self) -> &str {
        self.config.to_str().expect("utf-8 path")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir().join("node.log")).unwrap_or_default()
    }
}

pub struct ClusterOptions {
    pub nodes: usize,
    pub size: &'static str,
    pub lease: &'static str,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            size: "128MiB",
            lease: "4s",
        }
    }
}

impl Cluster {
    /// Creates and starts a cluster, waiting until every node sees every peer.
    pub fn start(opts: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ff-e2e-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let cdir = dir.path().join("c");
        let n = opts.nodes.to_string();
        let init = ff(&[
            "cluster",
            "init",
            cdir.to_str().expect("utf-8"),
            "--nodes",
            &n,
            "--size",
            opts.size,
            "--lease",
            opts.lease,
            "--json",
        ]);
        assert!(
            init.status.success(),
            "cluster init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let mut c = Cluster {
            dir,
            nodes: Vec::new(),
            writers: Vec::new(),
        };
        for i in 1..=opts.nodes {
            let name = format!("n{i}");
            let config = cdir.join("nodes").join(&name).join("node.toml");
            c.nodes.push(Node {
                name,
                config,
                child: None,
            });
        }
        for i in 0..c.nodes.len() {
            c.start_node(i);
        }
        c.wait_connected(Duration::from_secs(30));
        c
    }

    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.path().join("c")
    }

    pub fn volume(&self) -> PathBuf {
        self.cluster_dir().join("shared/volume.img")
    }

    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.run_dir().join("node.log"))
            .expect("log");
        let child = Command::new(exe())
            .args(["node", "run", "--config", node.cfg()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start node");
        node.child = Some(child);
    }

    /// Waits until every running node reports all of its running peers connected and is mounted.
    pub fn wait_connected(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        let running: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.name.as_str())
            .collect();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let out = ff(&["status", "--json", "--config", node.cfg()]);
                if out.status.success() {
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    let peers_ok = v["peers"].as_array().is_some_and(|ps| {
                        ps.iter().all(|p| {
                            p["connected"].as_bool() == Some(true)
                                || !running.contains(&p["node"].as_str().unwrap_or(""))
                        })
                    });
                    if peers_ok && v["mounted"].as_bool() == Some(true) {
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} did not come up; log:\n{}",
                    node.name,
                    node.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// SIGKILLs a node's daemon.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs a node and waits for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the demo application on node `i`, writing at `offset`; returns its freeze log path.
    pub fn start_writer(&mut self, i: usize, name: &str, offset: u64, extra: &[&str]) -> PathBuf {
        let node = &self.nodes[i];
        let log = node.run_dir().join(format!("{name}.freeze.log"));
        let child = Command::new(exe())
            .args([
                "demo-writer",
                "--name",
                name,
                "--offset",
                &offset.to_string(),
                "--len",
                &REGION.to_string(),
            ])
            .arg("--socket")
            .arg(node.run_dir().join("writer.sock"))
            .arg("--volume")
            .arg(node.live())
            .arg("--log")
            .arg(&log)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start demo writer");
        self.writers.push(child);
        wait_for(Duration::from_secs(10), || {
            let v = ff_json(&["status", "--json", "--config", node.cfg()]);
            v["writers"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["name"] == name))
        });
        log
    }

    pub fn create(&self, i: usize, extra: &[&str]) -> (bool, Value) {
        let mut args = vec![
            "snapshot",
            "create",
            "--json",
            "--config",
            self.nodes[i].cfg(),
        ];
        args.extend_from_slice(extra);
        let out = ff(&args);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "snapshot create printed no JSON: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (out.status.success(), v)
    }

    pub fn list(&self, i: usize) -> Vec<Value> {
        ff_json(&[
            "snapshot",
            "list",
            "--json",
            "--config",
            self.nodes[i].cfg(),
        ])
        .as_array()
        .cloned()
        .unwrap_or_default()
    }
}

pub const REGION: u64 = 1 << 20;

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.writers {
            let _ = w.kill();
            let _ = w.wait();
        }
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
        for n in &self.nodes {
            let mnt = n.mount();
            // A node killed by a test leaves its mount behind: clear it.
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&mnt)
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub fn wait_for(wait: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {wait:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// blake3 of a whole file, read in 1 MiB chunks.
pub fn hash_file(p: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}
