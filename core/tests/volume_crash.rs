//! Crash test: child processes writing through the engine (and now and then
//! creating a snapshot) are SIGKILLed at random instants, 100 rounds. After
//! each kill, every snapshot that existed reads back bit-exact to the image
//! recorded when it was first seen, and a fresh process can open, write and
//! snapshot the volume (no lock is left held).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use freezeframe_core::volume::{SnapshotOptions, Volume};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u32 = 4096;
const SIZE: u64 = 32 * BS as u64;
const CHILD_ENV: &str = "FF_CRASH_CHILD";
const ROUNDS: u64 = 100;

fn child_main() -> ! {
    let spec = std::env::var(CHILD_ENV).unwrap_or_default();
    let (seed, path) = spec.split_once(':').expect("spec");
    let mut rng = StdRng::seed_from_u64(seed.parse().expect("seed"));
    let v = Volume::open(&PathBuf::from(path)).expect("child opens the volume");
    loop {
        if rng.gen_range(0..40) == 0 {
            let id = v.reserve_snapshot_id().expect("reserve");
            v.create_snapshot(id, &SnapshotOptions::default())
                .expect("create");
            v.seal_snapshot(id).expect("seal");
        }
        let len = rng.gen_range(1..3 * BS as u64);
        let off = rng.gen_range(0..SIZE - len);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        v.write_at(&data, off).expect("child write");
    }
}

fn spawn_child(seed: u64, path: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "snapshots_survive_writers_killed_at_random_instants",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{seed}:{}", path.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn child")
}

fn image(v: &Volume, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    v.snapshot(id)
        .expect("handle")
        .read_at(&mut buf, 0)
        .expect("snapshot read");
    buf
}

#[test]
fn snapshots_survive_writers_killed_at_random_instants() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child_main();
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vol.img");
    let v = Volume::create(&path, SIZE, BS, None).expect("create");
    v.write_at(&vec![0x5A; SIZE as usize], 0).expect("fill");
    let mut rng = StdRng::seed_from_u64(2026);
    let mut known: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut parent_ids = Vec::new();
    let mut child_snapshots_seen = 0;
    for round in 0..ROUNDS {
        let children: Vec<_> = (0..2).map(|_| spawn_child(rng.gen(), &path)).collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(2..25)));
        if rng.gen_range(0..3) == 0 {
            // A snapshot taken while the children write; its image is read at once.
            let id = v.reserve_snapshot_id().expect("reserve");
            v.create_snapshot(id, &SnapshotOptions::default())
                .expect("create");
            known.insert(id, image(&v, id));
            parent_ids.push(id);
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..10)));
        }
        for mut c in children {
            // SAFETY: kill(2) on a child pid we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            c.wait().expect("reap child");
        }
        let fresh = Volume::open(&path).expect("open after kill");
        for info in fresh.snapshots().expect("list") {
            // Snapshots the children created are recorded when first seen, after their death.
            let img = image(&fresh, info.id);
            if !known.contains_key(&info.id) && !parent_ids.contains(&info.id) {
                child_snapshots_seen += 1;
            }
            let want = known.entry(info.id).or_insert_with(|| img.clone());
            assert!(
                img == *want,
                "round {round}: snapshot {} changed across a SIGKILL",
                info.id
            );
        }
        while known.len() > 6 {
            let victim = *known
                .keys()
                .nth(rng.gen_range(0..known.len()))
                .expect("some");
            fresh.delete_snapshot(victim).expect("delete");
            known.remove(&victim);
        }
        fresh
            .write_at(&[round as u8; 5000], rng.gen_range(0..SIZE - 5000))
            .expect("write after kill");
    }
    // Proof that the children really wrote through the engine and got killed mid-way.
    assert!(
        child_snapshots_seen > 0,
        "no child ever created a snapshot: children are not running"
    );
}
