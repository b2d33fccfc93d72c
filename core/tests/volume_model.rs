//! Model-based property test: random live writes from several threads and
//! from two child OS processes at once, while a reader checks every snapshot;
//! between those phases snapshots are created, written post-snapshot, sealed
//! and deleted at random. Every snapshot must read back bit-exact to the
//! model at every check, and `changed_blocks` must cover every block where
//! the model says two images differ.
//!
//! Each worker owns a byte region whose edges are not block-aligned, so
//! neighbours contend for the claim of the shared edge block; its writes are
//! generated from a seed, so the parent replays a child's writes into the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use freezeframe_core::volume::{SnapshotOptions, SnapshotState, Volume};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u32 = 4096;
const BLOCKS: u64 = 96;
const SIZE: u64 = BLOCKS * BS as u64;
const THREADS: u64 = 3;
const CHILDREN: u64 = 2;
const WRITES_PER_PHASE: u64 = 25;
const CHILD_ENV: &str = "FF_MODEL_CHILD";

/// Region of worker `k`: deliberately not block-aligned.
fn region(k: u64) -> (u64, u64) {
    let w = SIZE / (THREADS + CHILDREN);
    let start = k * w;
    let end = if k == THREADS + CHILDREN - 1 {
        SIZE
    } else {
        (k + 1) * w
    };
    (start, end)
}

/// The writes worker `k` makes in one phase; deterministic in `seed`.
fn worker_writes(seed: u64, k: u64) -> Vec<(u64, Vec<u8>)> {
    let (start, end) = region(k);
    let mut rng = StdRng::seed_from_u64(seed ^ (k << 32));
    let mut prev_end = start;
    (0..WRITES_PER_PHASE)
        .map(|_| {
            let len = rng.gen_range(1..=(3 * BS as u64).min(end - start));
            // Runs of sequential writes, as well as random ones.
            let off = if rng.gen_bool(0.4) && prev_end + len <= end {
                prev_end
            } else {
                rng.gen_range(start..=end - len)
            };
            prev_end = off + len;
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            (off, data)
        })
        .collect()
}

fn run_writes(v: &Volume, writes: &[(u64, Vec<u8>)]) {
    for (off, data) in writes {
        v.write_at(data, *off).expect("live write");
    }
}

fn child_main() {
    let spec = std::env::var(CHILD_ENV).unwrap_or_default();
    let mut parts = spec.splitn(3, ':');
    let seed: u64 = parts.next().and_then(|s| s.parse().ok()).expect("seed");
    let k: u64 = parts.next().and_then(|s| s.parse().ok()).expect("worker");
    let path = PathBuf::from(parts.next().expect("path"));
    let v = Volume::open(&path).expect("child opens the volume");
    run_writes(&v, &worker_writes(seed, k));
    std::process::exit(0);
}

fn spawn_child(test: &str, seed: u64, k: u64, path: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{seed}:{k}:{}", path.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child")
}

fn read_snapshot(v: &Volume, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    v.snapshot(id)
        .expect("snapshot handle")
        .read_at(&mut buf, 0)
        .expect("snapshot read");
    buf
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn check_all(v: &Volume, live: &[u8], snaps: &BTreeMap<u64, (Vec<u8>, bool)>, when: &str) {
    let mut buf = vec![0u8; SIZE as usize];
    v.read_at(&mut buf, 0).expect("live read");
    assert_eq!(
        first_difference(&buf, live),
        None,
        "{when}: live volume differs from the model"
    );
    for (id, (img, _)) in snaps {
        let got = read_snapshot(v, *id);
        if let Some(at) = first_difference(&got, img) {
            panic!(
                "{when}: snapshot {id} differs from the model at byte {at} (block {})",
                at as u64 / BS as u64
            );
        }
    }
    let blocks_differing = |a: &[u8], b: &[u8]| -> Vec<u64> {
        (0..BLOCKS)
            .filter(|blk| {
                a[(*blk * BS as u64) as usize..((blk + 1) * BS as u64) as usize]
                    != b[(*blk * BS as u64) as usize..((blk + 1) * BS as u64) as usize]
            })
            .collect()
    };
    let ids: Vec<u64> = snaps.keys().copied().collect();
    for (n, from) in ids.iter().enumerate() {
        let changed = v.changed_blocks(*from, None).expect("changed vs live");
        for b in blocks_differing(&snaps[from].0, live) {
            assert!(changed.contains(&b), "{when}: block {b} differs between snapshot {from} and live but is not in changed_blocks");
        }
        if let Some(to) = ids.get(n + 1) {
            let changed = v
                .changed_blocks(*from, Some(*to))
                .expect("changed between snapshots");
            for b in blocks_differing(&snaps[from].0, &snaps[to].0) {
                assert!(
                    changed.contains(&b),
                    "{when}: block {b} differs between {from} and {to} but is not listed"
                );
            }
        }
    }
}

fn run_seed(seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vol.img");
    let v = Volume::create(&path, SIZE, BS, None).expect("create");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live = vec![0u8; SIZE as usize];
    // id -> (model image, sealed)
    let mut snaps: BTreeMap<u64, (Vec<u8>, bool)> = BTreeMap::new();
    for phase in 0..8u64 {
        let phase_seed = rng.gen::<u64>();
        // Concurrent phase: threads + child processes write, a reader checks snapshots.
        let children: Vec<_> = (THREADS..THREADS + CHILDREN)
            .map(|k| {
                spawn_child(
                    "concurrent_writers_and_snapshots_match_the_model",
                    phase_seed,
                    k,
                    &path,
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (v, stop) = (v.clone(), stop.clone());
            let expect: Vec<(u64, Vec<u8>)> = snaps
                .iter()
                .map(|(id, (img, _))| (*id, img.clone()))
                .collect();
            std::thread::spawn(move || {
                let mut checks = 0;
                while !stop.load(Ordering::SeqCst) || checks == 0 {
                    for (id, img) in &expect {
                        let got = read_snapshot(&v, *id);
                        assert_eq!(
                            first_difference(&got, img),
                            None,
                            "snapshot {id} read wrong while live writes ran"
                        );
                    }
                    checks += 1;
                }
            })
        };
        let threads: Vec<_> = (0..THREADS)
            .map(|k| {
                let v = v.clone();
                std::thread::spawn(move || run_writes(&v, &worker_writes(phase_seed, k)))
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        for mut c in children {
            assert!(
                c.wait().expect("wait child").success(),
                "child writer failed"
            );
        }
        stop.store(true, Ordering::SeqCst);
        reader.join().expect("reader thread");
        for k in 0..THREADS + CHILDREN {
            for (off, data) in worker_writes(phase_seed, k) {
                live[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
        }
        check_all(
            &v,
            &live,
            &snaps,
            &format!("seed {seed} phase {phase} after writes"),
        );

        // Quiescent step: snapshot lifecycle at random.
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..10) {
                0..=3 => {
                    let id = v.reserve_snapshot_id().expect("reserve");
                    v.create_snapshot(id, &SnapshotOptions::default())
                        .expect("create");
                    snaps.insert(id, (live.clone(), false));
                }
                4..=6 => {
                    let open: Vec<u64> = snaps
                        .iter()
                        .filter(|(_, (_, sealed))| !sealed)
                        .map(|(id, _)| *id)
                        .collect();
                    if let Some(id) = open.get(rng.gen_range(0..open.len().max(1))) {
                        let len = rng.gen_range(1..2 * BS as usize);
                        let off = rng.gen_range(0..SIZE as usize - len);
                        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                        v.snapshot(*id)
                            .expect("handle")
                            .write_at(&data, off as u64)
                            .expect("post-snapshot write");
                        if let Some((img, _)) = snaps.get_mut(id) {
                            img[off..off + len].copy_from_slice(&data);
                        }
                    }
                }
                7 | 8 => {
                    if let Some(id) = snaps
                        .keys()
                        .nth(rng.gen_range(0..snaps.len().max(1)))
                        .copied()
                    {
                        v.seal_snapshot(id).expect("seal");
                        if let Some(s) = snaps.get_mut(&id) {
                            s.1 = true;
                        }
                        assert_eq!(
                            v.snapshot(id).expect("handle").state().expect("state"),
                            SnapshotState::Sealed
                        );
                    }
                }
                _ => {
                    if let Some(id) = snaps
                        .keys()
                        .nth(rng.gen_range(0..snaps.len().max(1)))
                        .copied()
                    {
                        v.delete_snapshot(id).expect("delete");
                        snaps.remove(&id);
                    }
                }
            }
        }
        check_all(
            &v,
            &live,
            &snaps,
            &format!("seed {seed} phase {phase} after lifecycle"),
        );
    }
}

#[test]
fn concurrent_writers_and_snapshots_match_the_model() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child_main();
    }
    for seed in [1, 2, 3] {
        run_seed(seed);
    }
}
