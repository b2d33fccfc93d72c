//! Damage is never served as data and never rolled back silently (issue 12):
//! every byte of a catalog slot and of a map flipped in turn either makes the
//! read fail with an error naming what is damaged or leaves it returning
//! exactly the original bytes; a damaged record makes the snapshot Invalid for
//! every process (also one that had the map cached); `volume check` explains,
//! and only `--repair` recovers; a volume-wide `diff_max` costs the oldest
//! snapshot, never a live write; failed attempts leave no map files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use freezeframe_core::volume::{
    check, InvalidCause, Invalidation, SnapshotOptions, SnapshotState, Volume,
};

const BS: u32 = 4096;
const BLOCKS: u64 = 64;

fn snapshot(v: &Volume) -> u64 {
    let id = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(id, &SnapshotOptions::default())
        .expect("create");
    id
}

fn image(v: &Volume, id: u64) -> freezeframe_core::Result<Vec<u8>> {
    let s = v.snapshot(id)?;
    let mut buf = vec![0u8; v.size() as usize];
    s.read_at(&mut buf, 0)?;
    Ok(buf)
}

fn pattern(tag: u8) -> Vec<u8> {
    (0..BLOCKS as usize * BS as usize)
        .map(|i| (i / 997) as u8 ^ tag)
        .collect()
}

/// A volume with one sealed snapshot whose map holds `copied` blocks, and its expected image.
fn volume_with_map(dir: &Path, copied: u64) -> (Volume, u64, Vec<u8>) {
    let v = Volume::create(&dir.join("vol.img"), BLOCKS * BS as u64, BS, None).expect("create");
    let original = pattern(0x11);
    v.write_at(&original, 0).expect("fill");
    let id = snapshot(&v);
    v.seal_snapshot(id).expect("seal");
    for b in 0..copied {
        // Every other block, one write each: one record per block.
        let blk = (b * 2) % BLOCKS;
        v.write_at(&[0xEE; 100], blk * BS as u64 + 7)
            .expect("live write");
    }
    assert_eq!(image(&v, id).expect("read"), original);
    (v, id, original)
}

fn flip(path: &Path, at: usize, mask: u8) -> Vec<u8> {
    let saved = std::fs::read(path).expect("read");
    let mut b = saved.clone();
    b[at] ^= mask;
    std::fs::write(path, &b).expect("write");
    saved
}

#[test]
fn every_flipped_byte_of_a_map_fails_the_read_or_returns_the_original_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id, original) = volume_with_map(dir.path(), 24);
    let map = v.state_dir().join(format!("snap-{id}.map"));
    let len = std::fs::metadata(&map).expect("stat").len() as usize;
    assert!(len > 4096 + 20 * 64, "map has its records: {len}");
    let (mut failed, mut same) = (0, 0);
    for at in 0..len {
        let mask = 1u8 << (at % 8);
        let saved = flip(&map, at, mask);
        // A fresh process view each time: nothing cached from before the flip.
        let r = Volume::open(v.path()).and_then(|fresh| image(&fresh, id));
        match r {
            Ok(img) => {
                assert!(
                    img == original,
                    "flip at byte {at} of the map served other bytes"
                );
                same += 1;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("snap-{id}.map")) || msg.contains("invalid"),
                    "flip at {at}: unclear error {msg}"
                );
                failed += 1;
            }
        }
        std::fs::write(&map, &saved).expect("restore");
        // Damage found by a reader is recorded in the catalog (Invalid); undo that for the next round.
        restore_catalog_state(&v, id);
    }
    // Every record byte is covered by its checksum: those flips must all fail.
    assert!(failed >= len - 4096, "failed {failed}, unchanged {same}");
}

/// Re-seals `id` if a previous round's damage made the catalog say Invalid
/// (the test restores the map's bytes, so the snapshot is intact again).
fn restore_catalog_state(v: &Volume, id: u64) {
    let fresh = Volume::open(v.path()).expect("reopen");
    let infos = fresh.snapshots().expect("list");
    if matches!(
        infos.iter().find(|s| s.id == id).map(|s| &s.state),
        Some(SnapshotState::Invalid { .. })
    ) {
        rewrite_state(fresh.state_dir(), id);
    }
}

/// Test-only surgery: rewrite the newest catalog slot with `id` sealed again.
fn rewrite_state(state: &Path, id: u64) {
    use freezeframe_core::format;
    let kind = format::Kind {
        magic: *b"FFCATALG",
        version: 1,
    };
    let mut best: Option<(PathBuf, serde_json::Value)> = None;
    for slot in ["catalog.a", "catalog.b"] {
        let p = state.join(slot);
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        let Ok((payload, _)) = format::decode(kind, &bytes) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
        if best
            .as_ref()
            .is_none_or(|(_, b)| v["generation"].as_u64() > b["generation"].as_u64())
        {
            best = Some((p, v));
        }
    }
    let (p, mut v) = best.expect("a slot");
    for s in v["snapshots"].as_array_mut().expect("array") {
        if s["id"].as_u64() == Some(id) {
            s["state"] = serde_json::json!({"state": "sealed"});
        }
    }
    let bytes = format::encode(kind, &serde_json::to_vec(&v).expect("json"));
    std::fs::write(p, bytes).expect("write slot");
}

#[test]
fn every_flipped_byte_of_a_catalog_slot_is_refused_or_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id, original) = volume_with_map(dir.path(), 4);
    let id2 = snapshot(&v);
    v.seal_snapshot(id2).expect("seal");
    let list = |vol: &Volume| -> Vec<(u64, SnapshotState)> {
        vol.snapshots()
            .expect("list")
            .into_iter()
            .map(|s| (s.id, s.state))
            .collect()
    };
    let want = list(&v);
    let img2 = image(&v, id2).expect("image 2");
    let mut outcomes = [0usize; 2];
    for slot in ["catalog.a", "catalog.b"] {
        let path = v.state_dir().join(slot);
        let len = std::fs::metadata(&path).expect("stat").len() as usize;
        for at in 0..len {
            let saved = flip(&path, at, 0x20);
            match Volume::open(v.path()) {
                Ok(fresh) => {
                    assert_eq!(
                        list(&fresh),
                        want,
                        "flip at {slot}:{at} changed the snapshot list"
                    );
                    assert!(
                        image(&fresh, id).expect("read") == original,
                        "flip at {slot}:{at}"
                    );
                    assert!(
                        image(&fresh, id2).expect("read") == img2,
                        "flip at {slot}:{at}"
                    );
                    outcomes[0] += 1;
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(slot),
                        "flip at {slot}:{at}: error does not name the slot: {msg}"
                    );
                    assert!(
                        msg.contains("volume check"),
                        "flip at {slot}:{at}: no way out named: {msg}"
                    );
                    outcomes[1] += 1;
                }
            }
            std::fs::write(&path, saved).expect("restore");
        }
    }
    // The older slot's flips change nothing; the newest slot's are all refused.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

#[test]
fn a_rolled_back_catalog_is_refused_until_the_operator_repairs_it_and_nothing_is_silently_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v =
        Volume::create(&dir.path().join("vol.img"), BLOCKS * BS as u64, BS, None).expect("create");
    v.write_at(&pattern(1), 0).expect("fill");
    let a = snapshot(&v);
    v.seal_snapshot(a).expect("seal a");
    let b = snapshot(&v);
    v.write_at(&[9u8; 4096], 0).expect("copy block 0 for b");
    // The newest change: b sealed. Damage the slot holding it.
    v.seal_snapshot(b).expect("seal b");
    let newest = ["catalog.a", "catalog.b"]
        .into_iter()
        .map(|s| v.state_dir().join(s))
        .max_by_key(|p| {
            let bytes = std::fs::read(p).expect("read");
            freezeframe_core::volume::decode::catalog_slot(&bytes)
                .map(|(g, _)| g)
                .unwrap_or(0)
        })
        .expect("slot");
    flip(&newest, 40, 0x01);

    // Every command refuses, naming the file and the way out.
    let err = Volume::open(v.path()).expect_err("refused").to_string();
    let name = newest
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(err.contains(&name) && err.contains("volume check"), "{err}");
    // A process that had it open fails at its next catalog reload, it does not write b.
    let err = v
        .snapshot(b)
        .and_then(|s| s.write_at(&[1], 0))
        .expect_err("no write into b after the damage");
    assert!(
        err.to_string().contains("roll back")
            || matches!(err, freezeframe_core::Error::SnapshotSealed { .. }),
        "{err}"
    );

    // check explains, changes nothing.
    let report = check(v.path(), false).expect("check");
    assert!(!report.is_clean());
    assert!(
        report.problems.iter().any(|p| p.contains("lost")),
        "{:?}",
        report.problems
    );
    assert!(report.repaired.is_empty());
    assert!(
        Volume::open(v.path()).is_err(),
        "check alone repairs nothing"
    );

    // repair accepts the older slot; b (Open there, sealed in the lost generation) becomes Invalid.
    let report = check(v.path(), true).expect("repair");
    assert!(report.is_clean(), "{:?}", report.unresolved);
    assert!(
        report
            .repaired
            .iter()
            .any(|r| r.contains(&format!("snapshot {b} marked INVALID"))),
        "{:?}",
        report.repaired
    );
    let fresh = Volume::open(v.path()).expect("opens after repair");
    let infos = fresh.snapshots().expect("list");
    let state = |id| infos.iter().find(|s| s.id == id).map(|s| s.state.clone());
    assert_eq!(state(a), Some(SnapshotState::Sealed));
    assert!(
        matches!(state(b), Some(SnapshotState::Invalid { reason }) if reason.contains("rolled back"))
    );
    assert!(
        fresh.snapshot(b).and_then(|s| s.write_at(&[1], 0)).is_err(),
        "b is not writable"
    );
    assert_eq!(image(&fresh, a).expect("a intact"), pattern(1));
    // New snapshots work and ids are never reused.
    let c = snapshot(&fresh);
    assert!(c > b);
    assert!(check(v.path(), false).expect("check").is_clean());
}

#[test]
fn a_damaged_map_record_makes_the_snapshot_invalid_for_every_process_including_one_with_the_map_cached(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id, original) = volume_with_map(dir.path(), 8);
    // `v` has the map cached and has read every block. Damage a record in the middle.
    let map = v.state_dir().join(format!("snap-{id}.map"));
    flip(&map, 4096 + 3 * 64 + 5, 0x04);
    let seen = Arc::new(Mutex::new(Vec::<Invalidation>::new()));
    let fresh = Volume::open(v.path()).expect("open");
    let s2 = seen.clone();
    fresh.on_invalidate(move |i| s2.lock().expect("lock").push(i.clone()));
    let err = image(&fresh, id)
        .expect_err("damage is not served")
        .to_string();
    assert!(
        err.contains("invalid") && err.contains(&format!("snap-{id}.map")),
        "{err}"
    );
    let got = seen.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].id, got[0].cause), (id, InvalidCause::Damage));
    // The process with the cached map agrees (the catalog now says Invalid).
    assert!(
        image(&v, id).is_err(),
        "a cached map must not keep serving a snapshot others found damaged"
    );
    assert!(
        matches!(&v.snapshots().expect("list")[0].state, SnapshotState::Invalid { reason } if reason.contains("damaged"))
    );
    // check names it; the live volume is untouched.
    let report = check(v.path(), false).expect("check");
    assert!(
        report
            .snapshots
            .iter()
            .any(|s| s.id == id && s.problems.iter().any(|p| p.contains("offset"))),
        "{report:?}"
    );
    let mut live = vec![0u8; BS as usize];
    v.read_at(&mut live, BS as u64).expect("live read");
    assert_eq!(&live[..], &original[BS as usize..2 * BS as usize]);
}

#[test]
fn a_damaged_diff_area_copy_is_reported_by_check_and_repair_marks_the_snapshot_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id, _) = volume_with_map(dir.path(), 3);
    let diff = v.state_dir().join("diff.dat");
    flip(&diff, 100, 0xFF);
    let report = check(v.path(), false).expect("check");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("fails its checksum")),
        "{:?}",
        report.problems
    );
    let report = check(v.path(), true).expect("repair");
    assert!(report.is_clean());
    let fresh = Volume::open(v.path()).expect("open");
    assert!(matches!(
        &fresh.snapshots().expect("list")[0].state,
        SnapshotState::Invalid { .. }
    ));
    assert!(image(&fresh, id).is_err());
}

#[test]
fn reaching_diff_max_drops_the_oldest_snapshot_and_every_live_write_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v =
        Volume::create(&dir.path().join("vol.img"), BLOCKS * BS as u64, BS, None).expect("create");
    let original = pattern(5);
    v.write_at(&original, 0).expect("fill");
    v.set_diff_max(Some(12 * BS as u64)).expect("diff_max");
    let seen = Arc::new(Mutex::new(Vec::<Invalidation>::new()));
    let s2 = seen.clone();
    v.on_invalidate(move |i| s2.lock().expect("lock").push(i.clone()));
    let old = snapshot(&v);
    v.write_at(&vec![1u8; 8 * BS as usize], 0)
        .expect("8 blocks copied for old");
    let new = snapshot(&v);
    let new_image = image(&v, new).expect("new image");
    // 6 more blocks would make 14 > 12: the oldest snapshot is dropped to make room.
    v.write_at(&vec![2u8; 6 * BS as usize], 20 * BS as u64)
        .expect("live write succeeds");
    let mut back = vec![0u8; 6 * BS as usize];
    v.read_at(&mut back, 20 * BS as u64).expect("read back");
    assert!(back.iter().all(|b| *b == 2));
    let got = seen.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].id, got[0].cause), (old, InvalidCause::NoSpace));
    assert!(got[0].reason.contains("diff_max"), "{}", got[0].reason);
    let err = image(&v, old).expect_err("old is gone").to_string();
    assert!(err.contains("diff_max"), "{err}");
    assert_eq!(image(&v, new).expect("new keeps its copies"), new_image);
    // Past even that: the newest is dropped too, and the live write still succeeds.
    v.write_at(&vec![3u8; 30 * BS as usize], 30 * BS as u64)
        .expect("live write succeeds");
    assert!(image(&v, new).is_err());
    // Deleting the invalid ones frees the space; a new snapshot works.
    v.delete_snapshot(old).expect("delete old");
    v.delete_snapshot(new).expect("delete new");
    let again = snapshot(&v);
    v.write_at(&[4u8; 10], 0).expect("write");
    let img = image(&v, again).expect("new snapshot reads");
    assert_eq!(img[0], 1);
}

#[test]
fn failed_and_interrupted_attempts_leave_no_map_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v =
        Volume::create(&dir.path().join("vol.img"), BLOCKS * BS as u64, BS, None).expect("create");
    let maps = |v: &Volume| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(v.state_dir())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".map"))
            .collect();
        n.sort();
        n
    };
    // An attempt that reserved an id and then failed (never created).
    let aborted = v.reserve_snapshot_id().expect("reserve");
    assert_eq!(maps(&v), vec![format!("snap-{aborted}.map")]);
    // A crash right after creating the file (0 bytes), for the next id.
    let crashed = v.reserve_snapshot_id().expect("reserve");
    std::fs::write(v.state_dir().join(format!("snap-{crashed}.map")), b"").expect("empty map");
    // A delete interrupted between the catalog change and the unlink.
    let kept = snapshot(&v);
    let deleted = snapshot(&v);
    let saved = std::fs::read(v.state_dir().join(format!("snap-{deleted}.map"))).expect("read");
    v.delete_snapshot(deleted).expect("delete");
    std::fs::write(v.state_dir().join(format!("snap-{deleted}.map")), saved)
        .expect("as if the unlink never happened");
    // The next attempt (in-flight lock) cleans all of it up, and keeps the live snapshot's map.
    let guard = v.try_begin_snapshot().expect("lock").expect("free");
    assert_eq!(maps(&v), vec![format!("snap-{kept}.map")]);
    drop(guard);
    // The same on open, and a later id still works.
    let more = v.reserve_snapshot_id().expect("reserve");
    drop(v);
    let v = Volume::open(&dir.path().join("vol.img")).expect("open");
    assert_eq!(maps(&v), vec![format!("snap-{kept}.map")]);
    assert!(
        v.create_snapshot(more, &SnapshotOptions::default()).is_ok(),
        "a reserved id is still creatable (its map is made again)"
    );
}

#[test]
fn a_map_with_a_damaged_header_costs_its_snapshot_not_the_live_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id, _) = volume_with_map(dir.path(), 2);
    let map = v.state_dir().join(format!("snap-{id}.map"));
    // Version 1 in the header: what a map written by an older build looks like.
    let mut bytes = std::fs::read(&map).expect("read");
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&map, bytes).expect("write");
    let fresh = Volume::open(v.path()).expect("open");
    fresh
        .write_at(&[0x77; 4096], 10 * BS as u64)
        .expect("the live write succeeds");
    let mut back = [0u8; 4096];
    fresh.read_at(&mut back, 10 * BS as u64).expect("read");
    assert_eq!(back, [0x77; 4096]);
    let info = fresh.snapshots().expect("list");
    assert!(
        matches!(&info[0].state, SnapshotState::Invalid { reason } if reason.contains("unsupported format version 1")),
        "{info:?}"
    );
    let err = image(&fresh, id).expect_err("not readable").to_string();
    assert!(err.contains("version 1"), "{err}");
}
