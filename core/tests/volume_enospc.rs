//! A full state filesystem never breaks the live volume (issue 12): the state
//! directory lives on a small loop-mounted ext4 (8 MiB); after a snapshot,
//! overwriting far more blocks than it can hold copies of keeps every live
//! write succeeding and reading back, while the snapshot becomes Invalid with
//! a reason naming the full filesystem and cannot be read. Deleting it frees
//! the space and a new snapshot works again. Needs root and mkfs.ext4,
//! losetup, mount (SKIPPED otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use freezeframe_core::volume::{
    InvalidCause, Invalidation, SnapshotOptions, SnapshotState, Volume,
};

const BS: u32 = 4096;
const SIZE: u64 = 12 << 20;

/// A mounted loop filesystem, unmounted and detached on drop (also on panic).
struct LoopFs {
    mnt: PathBuf,
    dev: Option<String>,
    mounted: bool,
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            match Command::new("umount").arg(&self.mnt).status() {
                Ok(st) if st.success() => {}
                other => eprintln!("umount {}: {other:?}", self.mnt.display()),
            }
        }
        if let Some(dev) = &self.dev {
            // Usually already gone: mount set autoclear on it.
            let _ = Command::new("losetup")
                .args(["-d", dev])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn tool(name: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

fn small_ext4(dir: &Path) -> Result<LoopFs, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (losetup and mount need it)".into());
    }
    for t in ["mkfs.ext4", "losetup", "mount", "umount"] {
        if !tool(t) {
            return Err(format!("{t} is not installed"));
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control (loop devices unavailable)".into());
    }
    let img = dir.join("state.ext4");
    let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
    f.set_len(8 << 20).map_err(|e| e.to_string())?;
    drop(f);
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .map_err(|e| e.to_string())?;
    if !ok.success() {
        return Err("mkfs.ext4 failed".into());
    }
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
    let mut fs = LoopFs {
        mnt: mnt.clone(),
        dev: None,
        mounted: false,
    };
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    fs.dev = Some(dev.clone());
    let ok = Command::new("mount")
        .arg(&dev)
        .arg(&mnt)
        .status()
        .map_err(|e| e.to_string())?;
    if !ok.success() {
        return Err(format!("mount {dev} failed"));
    }
    fs.mounted = true;
    Ok(fs)
}

fn pattern(tag: u8) -> Vec<u8> {
    (0..SIZE as usize).map(|i| (i / 4093) as u8 ^ tag).collect()
}

#[test]
fn a_full_state_filesystem_costs_the_snapshot_never_a_live_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = match small_ext4(dir.path()) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let state = fs.mnt.join("state");
    let vol_path = dir.path().join("vol.img");
    // The engine keeps per-thread lock descriptors open until the thread ends:
    // run on a thread of its own so the filesystem can be unmounted after it.
    let body = std::thread::spawn(move || run(&state, &vol_path));
    let result = body.join();
    drop(fs);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn run(state: &Path, vol_path: &Path) {
    let v = Volume::create(vol_path, SIZE, BS, Some(state)).expect("create");
    let before = pattern(0x21);
    v.write_at(&before, 0).expect("fill");
    let seen = Arc::new(Mutex::new(Vec::<Invalidation>::new()));
    let s2 = seen.clone();
    v.on_invalidate(move |i| s2.lock().expect("lock").push(i.clone()));

    let id = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(id, &SnapshotOptions::default())
        .expect("snapshot");
    // 12 MiB of copies cannot fit in the ~6 MiB free: every write must still succeed.
    let after = pattern(0x5A);
    for (k, chunk) in after.chunks(256 << 10).enumerate() {
        v.write_at(chunk, (k * (256 << 10)) as u64)
            .unwrap_or_else(|e| panic!("live write {k} failed: {e}"));
    }
    let mut back = vec![0u8; SIZE as usize];
    v.read_at(&mut back, 0).expect("read live");
    assert!(back == after, "the live volume reads back what was written");

    let got = seen.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].id, got[0].cause), (id, InvalidCause::NoSpace));
    let info = v.snapshots().expect("list");
    match &info[0].state {
        SnapshotState::Invalid { reason } => {
            assert!(reason.contains("full"), "reason names the space: {reason}")
        }
        other => panic!("snapshot should be invalid, is {other:?}"),
    }
    let err = v
        .snapshot(id)
        .expect("handle")
        .read_at(&mut [0u8; 16], 0)
        .expect_err("an invalid snapshot is not read");
    assert!(err.to_string().contains("full"), "{err}");
    // Another process agrees.
    let other = Volume::open(vol_path).expect("open");
    assert!(other
        .snapshot(id)
        .expect("handle")
        .read_at(&mut [0u8; 16], 0)
        .is_err());

    // Free the space: delete the invalid snapshot; a new one works.
    v.delete_snapshot(id).expect("delete");
    let id2 = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(id2, &SnapshotOptions::default())
        .expect("snapshot after freeing");
    v.write_at(&vec![0xC3; 64 * BS as usize], 0).expect("write");
    let s = v.snapshot(id2).expect("handle");
    let mut img = vec![0u8; 64 * BS as usize];
    s.read_at(&mut img, 0).expect("new snapshot reads");
    assert!(
        img == after[..64 * BS as usize],
        "the new snapshot holds the data as of its creation"
    );
}
