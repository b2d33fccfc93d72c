//! Real FUSE mounts of a real volume under a temporary directory: what a node shows
//! (issue 4). Every test skips, saying so, when /dev/fuse is missing.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freezeframe_core::vfs::Vfs;
use freezeframe_core::volume::{SnapshotId, SnapshotOptions, Volume};
use freezeframe_fusefs::{mount, MountConfig, MountHandle};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1024 * 1024;
const BS: u32 = 64 * 1024;

/// A volume in a temp dir plus its node mounts.
struct Node {
    dir: tempfile::TempDir,
    volume: Volume,
}

fn fuse_available(test: &str) -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("SKIPPED {test}: /dev/fuse is missing, no FUSE mount possible here");
    false
}

impl Node {
    fn new(size: u64) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = Volume::create(
            &dir.path().join("volume.img"),
            size,
            BS,
            Some(&dir.path().join("state")),
        )
        .expect("create volume");
        Node { dir, volume }
    }

    fn mount(&self, name: &str) -> MountHandle {
        let mp = self.dir.path().join(name);
        mount(
            Arc::new(Vfs::for_volume(self.volume.clone())),
            &mp,
            MountConfig::default(),
        )
        .expect("mount")
    }

    fn snapshot(&self) -> SnapshotId {
        let id = self.volume.reserve_snapshot_id().expect("reserve id");
        self.volume
            .create_snapshot(id, &SnapshotOptions { diff_limit: None })
            .expect("create snapshot");
        id
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

fn write_through(path: &Path, data: &[u8], offset: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for write: {e}", path.display()));
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_of(bytes: &[u8], scratch: &Path) -> String {
    let p = scratch.join("expected.bin");
    std::fs::write(&p, bytes).expect("write expected");
    run("sha256sum", &[p.to_str().expect("utf8")])
        .split_whitespace()
        .next()
        .expect("hash")
        .to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn snapshot_image_is_the_point_in_time_data_and_common_tools_work_on_it() {
    if !fuse_available("snapshot_image_is_the_point_in_time_data") {
        return;
    }
    let size = 8 * MIB;
    let node = Node::new(size);
    let m = node.mount("mnt");
    let live = m.mountpoint().join("live/volume.img");
    let before = pattern(size as usize, 0x11);
    write_through(&live, &before, 0);

    let id = node.snapshot();
    node.volume.seal_snapshot(id).expect("seal");
    let after = pattern(3 * MIB as usize, 0x77);
    write_through(&live, &after, MIB + 123);

    let snap = m.mountpoint().join(format!("snapshots/{id}/volume.img"));
    assert!(
        read_file(&snap) == before,
        "snapshot image differs from the point-in-time data"
    );
    let mut now = before.clone();
    now[(MIB + 123) as usize..(MIB + 123) as usize + after.len()].copy_from_slice(&after);
    assert!(
        read_file(&live) == now,
        "live image differs from what was written"
    );

    // The tools people use on a mounted snapshot.
    let scratch = tempfile::tempdir().expect("scratch");
    let ls = run("ls", &["-l", s(&snap)]);
    assert!(
        ls.starts_with("-r--r--r--") && ls.contains(&size.to_string()),
        "ls -l: {ls}"
    );
    assert_eq!(
        run("stat", &["-c", "%s %F", s(&snap)]).trim(),
        format!("{size} regular file")
    );
    let copy = scratch.path().join("copy.img");
    run("cp", &[s(&snap), s(&copy)]);
    assert!(read_file(&copy) == before, "cp copy differs");
    let dd_out = scratch.path().join("dd.img");
    run(
        "dd",
        &[
            &format!("if={}", s(&snap)),
            &format!("of={}", s(&dd_out)),
            "bs=1M",
            "status=none",
        ],
    );
    assert!(read_file(&dd_out) == before, "dd copy differs");
    let want = sha256_of(&before, scratch.path());
    let got = run("sha256sum", &[s(&snap)]);
    assert!(
        got.starts_with(&want),
        "sha256sum through the mount: {got}, expected {want}"
    );
    let tarball = scratch.path().join("snap.tar");
    run(
        "tar",
        &[
            "-C",
            s(&m.mountpoint().join("snapshots")),
            "-cf",
            s(&tarball),
            &id.to_string(),
        ],
    );
    let listed = run("tar", &["-tvf", s(&tarball)]);
    assert!(
        listed.contains(&format!("{id}/volume.img"))
            && listed.contains(&format!("{id}/manifest.json")),
        "tar: {listed}"
    );
    run("tar", &["-C", s(scratch.path()), "-xf", s(&tarball)]);
    assert!(
        read_file(&scratch.path().join(format!("{id}/volume.img"))) == before,
        "tar round trip differs"
    );

    // Manifest and latest.
    let manifest: serde_json::Value = serde_json::from_slice(&read_file(
        &m.mountpoint().join(format!("snapshots/{id}/manifest.json")),
    ))
    .expect("manifest is JSON");
    assert_eq!(manifest["id"], id);
    assert_eq!(manifest["status"]["state"], "sealed");
    assert_eq!(manifest["size"], size);
    assert_eq!(
        std::fs::read_link(m.mountpoint().join("snapshots/latest"))
            .expect("latest")
            .to_str(),
        Some(id.to_string().as_str())
    );

    // How the mount presents itself.
    let mounts = run(
        "findmnt",
        &["-n", "-o", "FSTYPE,SOURCE,OPTIONS", s(m.mountpoint())],
    );
    assert!(
        mounts.contains("fuse.freezeframe")
            && mounts.contains("freezeframe")
            && mounts.contains("nosuid")
            && mounts.contains("nodev"),
        "findmnt: {mounts}"
    );
    m.unmount().expect("unmount");
}

#[test]
fn post_snapshot_write_on_one_node_is_seen_on_another_and_sealed_snapshot_is_read_only() {
    if !fuse_available("post_snapshot_write") {
        return;
    }
    let node = Node::new(4 * MIB);
    let (a, b) = (node.mount("node-a"), node.mount("node-b"));
    write_through(
        &a.mountpoint().join("live/volume.img"),
        &pattern(4 * MIB as usize, 1),
        0,
    );
    let id = node.snapshot();
    let img = |m: &MountHandle| m.mountpoint().join(format!("snapshots/{id}/volume.img"));

    // Node B reads first (so a stale cache would show), then node A's writer modifies its region.
    let mut seen = vec![0u8; 4096];
    File::open(img(&b))
        .expect("open on b")
        .read_exact_at(&mut seen, 2 * MIB)
        .expect("read on b");
    let region = vec![0xABu8; 4096];
    let held_open = OpenOptions::new()
        .write(true)
        .open(img(&a))
        .expect("open snapshot for post-snapshot write");
    held_open
        .write_all_at(&region, 2 * MIB)
        .expect("post-snapshot write");
    File::open(img(&b))
        .expect("open on b")
        .read_exact_at(&mut seen, 2 * MIB)
        .expect("read on b");
    assert_eq!(
        seen, region,
        "node B does not see node A's post-snapshot write"
    );

    node.volume.seal_snapshot(id).expect("seal");
    std::thread::sleep(freezeframe_core::vfs::LISTING_TTL + Duration::from_millis(100));
    let err = OpenOptions::new()
        .write(true)
        .open(img(&b))
        .expect_err("a sealed snapshot must refuse writers");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "open for write after seal: {err}"
    );
    let err = held_open
        .write_all_at(&region, 0)
        .expect_err("a writer opened before the seal must be refused too");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "write after seal: {err}"
    );
    File::open(img(&a))
        .expect("open on a")
        .read_exact_at(&mut seen, 2 * MIB)
        .expect("read on a");
    assert_eq!(
        seen, region,
        "the post-snapshot write is part of the sealed snapshot"
    );
}

#[test]
fn deleted_snapshot_disappears_and_invalid_snapshot_never_returns_data() {
    if !fuse_available("deleted_and_invalid") {
        return;
    }
    let node = Node::new(4 * MIB);
    let m = node.mount("mnt");
    let live = m.mountpoint().join("live/volume.img");
    write_through(&live, &pattern(4 * MIB as usize, 3), 0);
    let gone = node.snapshot();
    node.volume.seal_snapshot(gone).expect("seal");
    assert!(m
        .mountpoint()
        .join(format!("snapshots/{gone}/volume.img"))
        .exists());
    node.volume.delete_snapshot(gone).expect("delete");
    std::thread::sleep(freezeframe_core::vfs::LISTING_TTL + Duration::from_millis(100));
    let err = std::fs::metadata(m.mountpoint().join(format!("snapshots/{gone}")))
        .expect_err("deleted snapshot still listed");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    assert!(
        std::fs::read_link(m.mountpoint().join("snapshots/latest")).is_err(),
        "latest points at a deleted snapshot"
    );

    // A diff area of one block overflows after two overwritten blocks: invalid.
    let id = node.volume.reserve_snapshot_id().expect("reserve");
    node.volume
        .create_snapshot(
            id,
            &SnapshotOptions {
                diff_limit: Some(BS as u64),
            },
        )
        .expect("create");
    node.volume.seal_snapshot(id).expect("seal");
    write_through(&live, &vec![9u8; 4 * BS as usize], 0);
    std::thread::sleep(freezeframe_core::vfs::LISTING_TTL + Duration::from_millis(100));
    let res = std::fs::read(m.mountpoint().join(format!("snapshots/{id}/volume.img")));
    let err = res.expect_err("an invalid snapshot must not be readable");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "reading an invalid snapshot: {err}"
    );
}

#[test]
fn ext4_made_in_the_live_volume_loop_mounts_from_the_snapshot_as_it_was() {
    if !fuse_available("ext4") {
        return;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIPPED ext4 test: no loop devices here");
        return;
    }
    let node = Node::new(64 * MIB);
    let m = node.mount("mnt");
    let live = m.mountpoint().join("live/volume.img");
    run("mkfs.ext4", &["-F", "-q", "-E", "nodiscard", s(&live)]);
    let fsdir = node.dir.path().join("fs");
    std::fs::create_dir_all(&fsdir).expect("mkdir");
    run("mount", &["-o", "loop", s(&live), s(&fsdir)]);
    std::fs::write(fsdir.join("a.txt"), b"before the snapshot").expect("write a");
    run("umount", &[s(&fsdir)]);

    let id = node.snapshot();
    node.volume.seal_snapshot(id).expect("seal");

    run("mount", &["-o", "loop", s(&live), s(&fsdir)]);
    std::fs::write(fsdir.join("a.txt"), b"after").expect("rewrite a");
    std::fs::write(fsdir.join("b.txt"), b"new").expect("write b");
    run("umount", &[s(&fsdir)]);

    let snapdir = node.dir.path().join("snapfs");
    std::fs::create_dir_all(&snapdir).expect("mkdir");
    run(
        "mount",
        &[
            "-o",
            "loop,ro,noload",
            s(&m.mountpoint().join(format!("snapshots/{id}/volume.img"))),
            s(&snapdir),
        ],
    );
    let a = std::fs::read(snapdir.join("a.txt"));
    let b_exists = snapdir.join("b.txt").exists();
    run("umount", &[s(&snapdir)]);
    assert_eq!(a.expect("a.txt in the snapshot"), b"before the snapshot");
    assert!(!b_exists, "b.txt was written after the snapshot");
}

#[test]
fn thousands_of_random_reads_through_the_mount_match_the_engine() {
    if !fuse_available("random_reads") {
        return;
    }
    let size = 16 * MIB;
    let node = Node::new(size);
    let m = node.mount("mnt");
    let live = m.mountpoint().join("live/volume.img");
    write_through(&live, &pattern(size as usize, 5), 0);
    let id = node.snapshot();
    node.volume.seal_snapshot(id).expect("seal");
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    // Overwrite scattered ranges so snapshot reads mix the diff area and the volume.
    for _ in 0..64 {
        let off = rng.gen_range(0..size - 100_000);
        let len = rng.gen_range(1..100_000);
        write_through(&live, &vec![rng.gen::<u8>(); len], off);
    }
    let snap = node.volume.snapshot(id).expect("engine snapshot");
    let files = [
        (
            File::open(m.mountpoint().join(format!("snapshots/{id}/volume.img")))
                .expect("open snap"),
            true,
        ),
        (File::open(&live).expect("open live"), false),
    ];
    for op in 0..4000 {
        let (f, is_snap) = &files[op % 2];
        let off = rng.gen_range(0..size + 1000);
        let len = rng.gen_range(1..300_000usize);
        let mut via_mount = vec![0u8; len];
        let n = read_at_most(f, &mut via_mount, off);
        let mut direct = vec![0u8; len];
        let m = if *is_snap {
            engine_read(|b, o| snap.read_at(b, o), &mut direct, off, size)
        } else {
            engine_read(|b, o| node.volume.read_at(b, o), &mut direct, off, size)
        };
        assert_eq!(n, m, "op {op}: length at {off}+{len} (snapshot: {is_snap})");
        assert!(
            via_mount[..n] == direct[..m],
            "op {op}: data differs at {off}+{len} (snapshot: {is_snap})"
        );
    }
}

fn read_at_most(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut done = 0;
    loop {
        let n = f
            .read_at(&mut buf[done..], off + done as u64)
            .expect("pread through the mount");
        done += n;
        if n == 0 || done == buf.len() {
            return done;
        }
    }
}

fn engine_read(
    read: impl Fn(&mut [u8], u64) -> freezeframe_core::Result<usize>,
    buf: &mut [u8],
    off: u64,
    size: u64,
) -> usize {
    if off >= size {
        return 0;
    }
    let want = buf.len().min((size - off) as usize);
    let mut done = 0;
    while done < want {
        let n = read(&mut buf[done..want], off + done as u64).expect("engine read");
        assert!(n > 0, "engine read returned 0 inside the image");
        done += n;
    }
    done
}

#[test]
fn held_live_writes_do_not_stall_snapshot_reads() {
    if !fuse_available("held_writes") {
        return;
    }
    let node = Node::new(4 * MIB);
    let m = node.mount("mnt");
    let live = m.mountpoint().join("live/volume.img");
    write_through(&live, &pattern(4 * MIB as usize, 8), 0);
    let id = node.snapshot();
    node.volume.seal_snapshot(id).expect("seal");
    let hold = node.volume.hold();
    let live2 = live.clone();
    let writer = std::thread::spawn(move || {
        let t = Instant::now();
        write_through(&live2, b"written while held", 0);
        t.elapsed()
    });
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let data = read_file(&m.mountpoint().join(format!("snapshots/{id}/volume.img")));
    assert_eq!(data.len() as u64, 4 * MIB);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a snapshot read waited on a held write: {:?}",
        t.elapsed()
    );
    assert!(
        !writer.is_finished(),
        "the live write went through while I/O was held"
    );
    drop(hold);
    let waited = writer.join().expect("writer");
    assert!(
        waited >= Duration::from_millis(200),
        "write returned after {waited:?}, before the hold was released"
    );
    let mut head = vec![0u8; 18];
    File::open(&live)
        .expect("open")
        .read_exact(&mut head)
        .expect("read");
    assert_eq!(&head, b"written while held");
}

/// When this env var names a directory, the test binary serves a mount there (see
/// `serve_mount_in_child`) instead of running tests.
const SERVE_ENV: &str = "FREEZEFRAME_TEST_SERVE_MOUNT";

#[test]
fn serve_mount_in_child() {
    // Only does something when re-executed by the kill test.
    let Some(dir) = std::env::var_os(SERVE_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let volume = Volume::create(
        &dir.join("volume.img"),
        256 * MIB,
        BS,
        Some(&dir.join("state")),
    )
    .expect("create");
    let m = mount(
        Arc::new(Vfs::for_volume(volume)),
        &dir.join("mnt"),
        MountConfig::default(),
    )
    .expect("child mount");
    std::fs::write(dir.join("ready"), b"").expect("ready flag");
    std::thread::sleep(Duration::from_secs(120));
    drop(m);
}

/// Lazily unmounts whatever is still mounted at the path when dropped.
struct DetachOnDrop(PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if freezeframe_fusefs::is_mounted(&self.0) {
            let _ = freezeframe_fusefs::stale::lazy_unmount(&self.0);
        }
    }
}

#[test]
fn killing_the_serving_process_fails_a_long_read_promptly_and_the_mount_point_recovers() {
    if !fuse_available("kill") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "serve_mount_in_child", "--nocapture"])
        .env(SERVE_ENV, dir.path())
        .spawn()
        .expect("spawn child");
    let t = Instant::now();
    while !dir.path().join("ready").exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "child never mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mp = dir.path().join("mnt");
    // Whatever happens below, leave no dead mount behind in /tmp.
    let _detach = DetachOnDrop(mp.clone());
    let live = mp.join("live/volume.img");
    let reader = std::thread::spawn(move || {
        let mut f = File::open(&live).expect("open live");
        let mut buf = vec![0u8; MIB as usize];
        loop {
            match f.read(&mut buf) {
                Ok(0) => {
                    // Start over: the read must be running when the server dies.
                    f = File::open(&live).map_err(|e| (e, Instant::now()))?;
                }
                Ok(_) => {}
                Err(e) => return Err((e, Instant::now())),
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), (std::io::Error, Instant)>(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reader.is_finished(), "reader stopped before the kill");
    child.kill().expect("kill child");
    let killed = Instant::now();
    child.wait().expect("reap child");
    let (err, at) = reader
        .join()
        .expect("reader thread")
        .expect_err("the read must fail");
    assert!(
        at.duration_since(killed) < Duration::from_secs(5),
        "reader hung {:?} after the kill",
        at.duration_since(killed)
    );
    // ECONNABORTED for a request in flight when the connection died, ENOTCONN after.
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN) | Some(libc::ECONNABORTED) | Some(libc::EIO)
        ),
        "reader error: {err}"
    );

    // The dead mount is found and cleared; a new mount at the same place works.
    assert!(
        freezeframe_fusefs::clear_stale_mount(&mp).expect("clear"),
        "no stale mount found"
    );
    let node = Node::new(MIB);
    let m = mount(
        Arc::new(Vfs::for_volume(node.volume.clone())),
        &mp,
        MountConfig::default(),
    )
    .expect("remount");
    assert_eq!(
        std::fs::metadata(m.mountpoint().join("live/volume.img"))
            .expect("stat")
            .len(),
        MIB
    );
}

#[test]
fn a_damaged_map_record_is_eio_on_every_mount_never_live_data() {
    if !fuse_available("damaged_map") {
        return;
    }
    let node = Node::new(4 * MIB);
    let m = node.mount("mnt");
    let live = m.mountpoint().join("live/volume.img");
    let original = pattern(4 * MIB as usize, 5);
    write_through(&live, &original, 0);
    let id = node.snapshot();
    node.volume.seal_snapshot(id).expect("seal");
    write_through(&live, &vec![0xAB; 8 * BS as usize], 0);
    let snap = m.mountpoint().join(format!("snapshots/{id}/volume.img"));
    // The mount reads it once (its map is now cached in this process).
    assert!(std::fs::read(&snap).expect("read snapshot") == original);

    // One flipped bit in the third record of the map on disk.
    let map = node.volume.state_dir().join(format!("snap-{id}.map"));
    let mut bytes = std::fs::read(&map).expect("read map");
    bytes[4096 + 2 * 64 + 9] ^= 0x02;
    std::fs::write(&map, bytes).expect("write map");

    // Another process (a fresh open) finds the damage and records it...
    let other = Volume::open(node.volume.path()).expect("open");
    let mut buf = vec![0u8; BS as usize];
    assert!(other
        .snapshot(id)
        .expect("handle")
        .read_at(&mut buf, 0)
        .is_err());
    // ...and the mount, whose cached map never re-reads that record, agrees: EIO.
    std::thread::sleep(freezeframe_core::vfs::LISTING_TTL + Duration::from_millis(100));
    let err = std::fs::read(&snap).expect_err("a damaged snapshot must not be readable");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // A second, fresh mount of the same volume: EIO too.
    let fresh = Node {
        dir: tempfile::tempdir().expect("tempdir"),
        volume: other,
    };
    let m2 = fresh.mount("mnt2");
    let err = std::fs::read(m2.mountpoint().join(format!("snapshots/{id}/volume.img")));
    match err {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        Ok(_) => panic!("a fresh mount served a damaged snapshot"),
    }
}
