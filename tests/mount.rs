//! Issue 4: the live volume and virtual snapshots mounted on every node, with
//! real daemons, real FUSE mounts and real tools on top of them.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn pattern(node: usize, gen: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(node as u8 * 7)
                .wrapping_add(gen.wrapping_mul(101))
        })
        .collect()
}

#[test]
fn every_node_mounts_the_same_point_in_time_image() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let c = Cluster::start(ClusterOptions {
        size: "32MiB",
        ..Default::default()
    });
    let size = 32 * MIB as usize;
    let mut expected = vec![0u8; size];
    // Each node writes its own 3 MiB through its own live/volume.img.
    for (i, n) in c.nodes.iter().enumerate() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(n.live())
            .expect("open live");
        let data = pattern(i, 1, 3 * MIB as usize);
        let at = (i as u64 * 5 + 1) * MIB + 12345;
        f.write_all_at(&data, at).expect("write live");
        f.sync_all().expect("fsync live");
        expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    let (ok, report) = c.create(1, &[]);
    assert!(ok, "{report}");
    let id = report["id"].as_u64().expect("id");
    // Overwrite everything each node wrote, from another node.
    for i in 0..c.nodes.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.nodes[(i + 1) % 3].live())
            .expect("open live");
        let at = (i as u64 * 5 + 1) * MIB;
        f.write_all_at(&pattern(i, 2, 4 * MIB as usize), at)
            .expect("overwrite");
        f.sync_all().expect("fsync");
    }
    let want = blake3::hash(&expected).to_hex().to_string();
    for n in &c.nodes {
        assert_eq!(
            hash_file(&n.snapshot_image(id)),
            want,
            "snapshot {id} on {} is the point-in-time image",
            n.name
        );
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(n.mount().join(format!("snapshots/{id}/manifest.json")))
                .expect("manifest"),
        )
        .expect("manifest json");
        assert_eq!(m["initiator"], "n2");
        assert_eq!(m["id"], id);
    }
    // `latest` points at it, and `snapshot verify` records the same hash.
    let latest = std::fs::read_link(c.nodes[0].mount().join("snapshots/latest")).expect("latest");
    assert_eq!(latest.to_str(), Some(id.to_string().as_str()));
    let v = ff_json(&[
        "snapshot",
        "verify",
        &id.to_string(),
        "--json",
        "--config",
        c.nodes[2].cfg(),
    ]);
    assert_eq!(v["blake3"], want.as_str());
    // Tools people use work on the snapshot mount.
    let dir = c.nodes[0].mount().join(format!("snapshots/{id}"));
    let img = dir.join("volume.img");
    for (cmd, arg) in [("ls", &dir), ("stat", &img), ("sha256sum", &img)] {
        let out = Command::new(cmd)
            .arg(if cmd == "ls" { "-l" } else { "--" })
            .arg(arg)
            .output()
            .expect(cmd);
        assert!(
            out.status.success(),
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let copy = c.dir.path().join("copy.img");
    let out = Command::new("cp")
        .arg(&img)
        .arg(&copy)
        .output()
        .expect("cp");
    assert!(out.status.success());
    assert_eq!(hash_file(&copy), want, "cp of the snapshot image");
    let tar = c.dir.path().join("snap.tar");
    let out = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&dir)
        .arg(".")
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A deleted snapshot disappears from every node's mount.
    ff_json(&[
        "snapshot",
        "delete",
        &id.to_string(),
        "--json",
        "--config",
        c.nodes[0].cfg(),
    ]);
    wait_for(Duration::from_secs(3), || {
        c.nodes
            .iter()
            .all(|n| !n.mount().join(format!("snapshots/{id}")).exists())
    });
}

#[test]
fn a_remote_writers_post_snapshot_change_is_seen_everywhere_then_the_snapshot_is_read_only() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions {
        size: "32MiB",
        ..Default::default()
    });
    let log = c.start_writer(2, "post-n3", 4 * MIB, &["--post-mark"]);
    c.start_writer(0, "app-n1", 0, &[]);
    std::thread::sleep(Duration::from_millis(200));
    let (ok, report) = c.create(0, &[]);
    assert!(ok, "{report}");
    let id = report["id"].as_u64().expect("id");
    for n in &c.nodes {
        let image = n.snapshot_image(id);
        let v = ff_json(&[
            "demo-check",
            "--image",
            image.to_str().expect("utf-8"),
            "--offset",
            &(4 * MIB).to_string(),
            "--len",
            &REGION.to_string(),
            "--name",
            "post-n3",
            "--log",
            log.to_str().expect("utf-8"),
            "--snapshot",
            &id.to_string(),
        ]);
        assert_eq!(
            v["post_mark"], id,
            "the post-snapshot change is visible on {}: {v}",
            n.name
        );
        assert_eq!(v["consistent"], true, "{v}");
    }
    // Not in the live volume.
    let mut last = [0u8; 64];
    let f = std::fs::File::open(c.nodes[0].live()).expect("live");
    f.read_exact_at(&mut last, 4 * MIB + REGION - 64)
        .expect("read live");
    assert!(
        last.iter().all(|&b| b == 0),
        "post-snapshot writes never reach the live volume"
    );
    // Sealed: writes are refused.
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(c.nodes[1].snapshot_image(id))
        .and_then(|f| f.write_all_at(b"x", 0))
        .expect_err("a complete snapshot is read-only");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
        ),
        "unexpected error {err:?}"
    );
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_ext4_frozen_by_a_hook_snapshots_clean_and_loop_mounts_read_only() {
    if !fuse_available() || !which("mkfs.ext4") || !which("fsfreeze") || !which("losetup") {
        eprintln!("SKIPPED: needs mkfs.ext4, fsfreeze, losetup");
        return;
    }
    let c = Cluster::start(ClusterOptions {
        size: "64MiB",
        ..Default::default()
    });
    let live = c.nodes[0].live();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(&live)
        .output()
        .expect("mkfs");
    assert!(
        out.status.success(),
        "mkfs.ext4 on live/volume.img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fs = c.dir.path().join("fs");
    std::fs::create_dir(&fs).expect("mkdir");
    let out = Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&live)
        .arg(&fs)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "loop mount of live/volume.img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _um = Unmount(fs.clone());
    // The application: files in the ext4; its freeze hook is fsfreeze.
    std::fs::write(fs.join("before.txt"), "written before the snapshot\n").expect("write");
    std::fs::write(fs.join("big.bin"), pattern(0, 3, 5 * MIB as usize)).expect("write big");
    let hook = c.nodes[0].dir().join("hooks.d/10-fsfreeze");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ncase \"$1\" in freeze) exec fsfreeze -f {0};; thaw|abort) exec fsfreeze -u {0};; esac\n",
            fs.display()
        ),
    )
    .expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (ok, report) = c.create(2, &[]);
    assert!(ok, "{report}");
    let id = report["id"].as_u64().expect("id");
    std::fs::write(fs.join("after.txt"), "written after\n").expect("write after");
    std::fs::write(fs.join("before.txt"), "changed after the snapshot\n").expect("rewrite");
    // The snapshot, from another node's mount, as a read-only filesystem.
    let snapfs = c.dir.path().join("snapfs");
    std::fs::create_dir(&snapfs).expect("mkdir");
    let out = Command::new("mount")
        .arg("-o")
        .arg("loop,ro,noload")
        .arg(c.nodes[1].snapshot_image(id))
        .arg(&snapfs)
        .output()
        .expect("mount snapshot");
    assert!(
        out.status.success(),
        "loop mount of the snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _um2 = Unmount(snapfs.clone());
    assert_eq!(
        std::fs::read_to_string(snapfs.join("before.txt")).expect("read"),
        "written before the snapshot\n"
    );
    assert_eq!(
        std::fs::read(snapfs.join("big.bin")).expect("read big"),
        pattern(0, 3, 5 * MIB as usize)
    );
    assert!(
        !snapfs.join("after.txt").exists(),
        "a file written after the snapshot is not in it"
    );
}

#[test]
fn killing_a_daemon_mid_read_fails_the_reader_promptly_and_a_restart_remounts() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions {
        size: "64MiB",
        ..Default::default()
    });
    let (ok, report) = c.create(0, &[]);
    assert!(ok, "{report}");
    let id = report["id"].as_u64().expect("id");
    let image = c.nodes[1].snapshot_image(id);
    // A reader going through the image again and again, uncached.
    let reader = std::thread::spawn(move || -> (std::io::Result<()>, std::time::Instant) {
        use std::os::unix::fs::OpenOptionsExt;
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&image)
        {
            Ok(f) => f,
            Err(e) => return (Err(e), std::time::Instant::now()),
        };
        let mut buf = AlignedBuf::new(MIB as usize);
        loop {
            for i in 0..64u64 {
                if let Err(e) = f.read_exact_at(buf.as_mut(), i * MIB) {
                    return (Err(e), std::time::Instant::now());
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = std::time::Instant::now();
    c.kill(1);
    let (result, failed_at) = reader.join().expect("reader thread");
    assert!(result.is_err(), "the reader must see an error");
    assert!(
        failed_at.duration_since(killed_at) < Duration::from_secs(2),
        "error came promptly"
    );
    // Restart: the stale mount is cleared and the node serves again.
    c.start_node(1);
    c.wait_connected(Duration::from_secs(20));
    assert_eq!(
        hash_file(&c.nodes[1].snapshot_image(id)),
        hash_file(&c.nodes[0].snapshot_image(id))
    );
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}
impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of len bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}
impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated in new with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}
// SAFETY: the buffer is owned and only used by one thread at a time.
unsafe impl Send for AlignedBuf {}

#[test]
fn restic_backs_up_a_snapshot_from_the_mount() {
    if !fuse_available() || !which("restic") {
        eprintln!("SKIPPED: needs restic");
        return;
    }
    let c = Cluster::start(ClusterOptions {
        size: "16MiB",
        ..Default::default()
    });
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.nodes[0].live())
        .expect("live");
    f.write_all_at(&pattern(0, 9, 2 * MIB as usize), MIB)
        .expect("write");
    f.sync_all().expect("fsync");
    let (ok, report) = c.create(0, &[]);
    assert!(ok, "{report}");
    let id = report["id"].as_u64().expect("id");
    let repo = c.dir.path().join("restic");
    let restic = |args: &[&str]| {
        Command::new("restic")
            .args(args)
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD", "test")
            .output()
            .expect("restic")
    };
    assert!(restic(&["init", "-q"]).status.success());
    let snapdir = c.nodes[2].mount().join(format!("snapshots/{id}"));
    let out = restic(&["backup", "-q", snapdir.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "restic backup of the mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = c.dir.path().join("restored");
    assert!(restic(&[
        "restore",
        "latest",
        "--target",
        restored.to_str().expect("utf-8")
    ])
    .status
    .success());
    let back = restored
        .join(snapdir.strip_prefix("/").expect("absolute"))
        .join("volume.img");
    assert_eq!(hash_file(&back), hash_file(&c.nodes[0].snapshot_image(id)));
}
