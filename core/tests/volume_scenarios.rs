//! Scenarios of the volume engine, one claim of the issue each: copy once for
//! several snapshots, 32 live snapshots, changed blocks from the maps,
//! post-snapshot writes then seal, delete reclaims space, hold, busy, state
//! directory found by itself.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use freezeframe_core::volume::{SnapshotOptions, SnapshotState, Volume};

const BS: u32 = 4096;

fn new_volume(dir: &Path, blocks: u64) -> Volume {
    let v =
        Volume::create(&dir.join("vol.img"), blocks * BS as u64, BS, None).expect("create volume");
    let fill: Vec<u8> = (0..blocks * BS as u64).map(|i| (i % 251) as u8).collect();
    v.write_at(&fill, 0).expect("fill");
    v
}

fn snap(v: &Volume) -> u64 {
    let id = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(id, &SnapshotOptions::default())
        .expect("create snapshot");
    id
}

fn image(v: &Volume, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; v.size() as usize];
    let n = v
        .snapshot(id)
        .expect("snapshot")
        .read_at(&mut buf, 0)
        .expect("read snapshot");
    assert_eq!(n, buf.len());
    buf
}

fn live(v: &Volume) -> Vec<u8> {
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(&mut buf, 0).expect("read live");
    buf
}

#[test]
fn a_block_copied_for_two_snapshots_is_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 8);
    let before = live(&v);
    let a = snap(&v);
    let b = snap(&v);
    v.write_at(&[0xAA; 100], 5 * BS as u64 + 10)
        .expect("live write");
    assert_eq!(image(&v, a), before);
    assert_eq!(image(&v, b), before);
    let diff_len = std::fs::metadata(v.state_dir().join("diff.dat"))
        .expect("stat")
        .len();
    assert_eq!(diff_len, BS as u64, "one slot for both snapshots");
    let infos = v.snapshots().expect("list");
    assert!(
        infos
            .iter()
            .all(|s| s.diff_blocks == 1 && s.state == SnapshotState::Open),
        "{infos:?}"
    );
}

#[test]
fn thirty_two_snapshots_each_keep_their_point_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 16);
    let mut expect = Vec::new();
    for k in 0..32u8 {
        let id = snap(&v);
        expect.push((id, live(&v)));
        v.write_at(&[k; 3000], (k as u64 * 1777) % (15 * BS as u64))
            .expect("write");
    }
    for (id, img) in &expect {
        assert_eq!(&image(&v, *id), img, "snapshot {id}");
    }
    assert_eq!(v.snapshots().expect("list").len(), 32);
}

#[test]
fn changed_blocks_come_from_the_maps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 16);
    let a = snap(&v);
    v.write_at(&[1; 10], 2 * BS as u64).expect("write");
    v.write_at(&[1; 10], 7 * BS as u64).expect("write");
    let b = snap(&v);
    v.write_at(&[2; 10], 7 * BS as u64).expect("write");
    v.write_at(&[2; 10], 9 * BS as u64).expect("write");
    assert_eq!(v.changed_blocks(a, None).expect("a..live"), vec![2, 7, 9]);
    assert_eq!(v.changed_blocks(b, None).expect("b..live"), vec![7, 9]);
    // a and b differ at 2 and 7; block 9 was copied for both at once, so it is the same slot.
    assert_eq!(v.changed_blocks(a, Some(b)).expect("a..b"), vec![2, 7]);
}

#[test]
fn post_snapshot_writes_land_in_the_snapshot_until_it_is_sealed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 8);
    let before = live(&v);
    let id = snap(&v);
    let s = v.snapshot(id).expect("open snapshot");
    s.write_at(b"post-snapshot", BS as u64 - 4)
        .expect("post-snapshot write");
    s.write_at(b"again", BS as u64 - 2)
        .expect("rewrite of a private block");
    assert_eq!(live(&v), before, "the live volume is untouched");
    let mut want = before.clone();
    want[BS as usize - 4..BS as usize + 9].copy_from_slice(b"post-snapshot");
    want[BS as usize - 2..BS as usize + 3].copy_from_slice(b"again");
    assert_eq!(image(&v, id), want);
    v.write_at(&[9; 8192], 0)
        .expect("live overwrite after post-snapshot write");
    assert_eq!(image(&v, id), want);
    v.seal_snapshot(id).expect("seal");
    let err = s.write_at(b"x", 0).expect_err("sealed");
    assert_eq!(
        err.to_string(),
        format!("snapshot {id} is sealed (read-only)")
    );
}

#[test]
fn deleting_snapshots_gives_the_diff_area_space_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 64);
    let a = snap(&v);
    v.write_at(&vec![1; 32 * BS as usize], 0).expect("write");
    let b = snap(&v);
    v.write_at(&vec![2; 64 * BS as usize], 0).expect("write");
    let diff = v.state_dir().join("diff.dat");
    let used = |p: &Path| std::fs::metadata(p).expect("stat").blocks() * 512;
    let full = used(&diff);
    let b_img = image(&v, b);
    v.delete_snapshot(a).expect("delete a");
    assert!(used(&diff) < full, "holes punched for a's private slots");
    assert_eq!(image(&v, b), b_img, "b intact after a is gone");
    assert!(v.snapshot(a).is_err());
    v.delete_snapshot(b).expect("delete b");
    assert_eq!(used(&diff), 0);
    assert!(v
        .delete_snapshot(b)
        .expect_err("twice")
        .to_string()
        .contains("does not exist"));
}

#[test]
fn hold_blocks_live_writes_until_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 4);
    let guard = v.hold();
    let done = Arc::new(AtomicBool::new(false));
    let t = {
        let (v, done) = (v.clone(), done.clone());
        std::thread::spawn(move || {
            v.write_at(&[7; 10], 0).expect("write");
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "write went through a hold");
    let mut b = [0u8; 10];
    v.read_at(&mut b, 0).expect("reads are not held");
    drop(guard);
    t.join().expect("writer");
    assert!(done.load(Ordering::SeqCst));
}

#[test]
fn a_second_snapshot_request_is_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 4);
    let other = Volume::open(v.path()).expect("second handle");
    let first = v.try_begin_snapshot().expect("lock").expect("free");
    assert!(
        other.try_begin_snapshot().expect("lock").is_none(),
        "second request must be busy"
    );
    drop(first);
    assert!(other.try_begin_snapshot().expect("lock").is_some());
}

#[test]
fn the_state_directory_is_found_by_itself_also_when_given_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data.img");
    let state = dir.path().join("shared-state");
    let v = Volume::create(&path, 1 << 20, 65536, Some(&state)).expect("create");
    v.write_at(b"hello", 0).expect("write");
    let again = Volume::open(&path).expect("open");
    assert_eq!(again.state_dir(), state.as_path());
    assert_eq!(again.block_size(), 65536);
    let err = Volume::create(&path, 1 << 20, 65536, None).expect_err("twice");
    assert!(
        err.to_string().contains("already has freezeframe state"),
        "{err}"
    );
}

#[test]
fn snapshot_ids_must_be_reserved_and_are_never_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 4);
    assert!(
        v.create_snapshot(5, &SnapshotOptions::default()).is_err(),
        "not reserved"
    );
    let id = snap(&v);
    v.delete_snapshot(id).expect("delete");
    let err = v
        .create_snapshot(id, &SnapshotOptions::default())
        .expect_err("reuse");
    assert!(err.to_string().contains("never reused"), "{err}");
}

#[test]
fn a_sequential_writer_keeps_every_snapshot_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 64);
    let original = live(&v);
    let a = snap(&v);
    let s = v.snapshot(a).expect("handle");
    s.write_at(b"private", 40 * BS as u64)
        .expect("post-snapshot write before the writer gets there");
    let mut a_img = original.clone();
    a_img[40 * BS as usize..40 * BS as usize + 7].copy_from_slice(b"private");
    let mut b_img = None;
    for k in 0..64u64 {
        v.write_at(&[k as u8 ^ 0x3C; BS as usize], k * BS as u64)
            .expect("sequential write");
        if k == 20 {
            let b = snap(&v);
            b_img = Some((b, live(&v)));
        }
        if k % 8 == 0 {
            assert_eq!(
                image(&v, a),
                a_img,
                "snapshot a while the writer is at block {k}"
            );
        }
    }
    assert_eq!(image(&v, a), a_img);
    let (b, b_want) = b_img.expect("b taken");
    assert_eq!(image(&v, b), b_want);
    let want_live: Vec<u8> = (0..64u64)
        .flat_map(|k| vec![k as u8 ^ 0x3C; BS as usize])
        .collect();
    assert_eq!(live(&v), want_live);
    let changed = v.changed_blocks(a, None).expect("changed");
    assert_eq!(changed, (0..64).collect::<Vec<u64>>());
}

#[test]
fn small_sequential_appends_list_only_the_blocks_they_touched_as_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = Volume::create(&dir.path().join("v.img"), 64 * BS as u64, BS, None).expect("create");
    let id = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(id, &SnapshotOptions::default())
        .expect("create snapshot");
    // An application appending 512-byte records through three blocks.
    for i in 0..(3 * BS as u64 / 512) {
        v.write_at(&[7u8; 512], 5 * BS as u64 + i * 512)
            .expect("append");
    }
    assert_eq!(v.changed_blocks(id, None).expect("changed"), vec![5, 6, 7]);
    assert_eq!(
        v.snapshots().expect("list")[0].diff_blocks,
        3,
        "nothing copied ahead"
    );
}

#[test]
fn ids_reserved_by_two_processes_can_be_created_in_either_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = new_volume(dir.path(), 4);
    let first = v.reserve_snapshot_id().expect("reserve");
    let second = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(second, &SnapshotOptions::default())
        .expect("the later reservation first");
    v.create_snapshot(first, &SnapshotOptions::default())
        .expect("then the earlier one");
    let err = v
        .create_snapshot(first, &SnapshotOptions::default())
        .expect_err("twice");
    assert!(err.to_string().contains("never reused"), "{err}");
}
