//! Bad input never panics and each kind gets its own clear error: wrong magic,
//! truncated map, diff area full, volume shorter than its catalog, damaged
//! diff-area data, missing state, random garbage in the catalog.

use std::path::Path;

use freezeframe_core::volume::{SnapshotOptions, SnapshotState, Volume};

const BS: u32 = 4096;

fn setup(dir: &Path) -> (Volume, u64) {
    let v = Volume::create(&dir.join("vol.img"), 16 * BS as u64, BS, None).expect("create");
    v.write_at(&vec![3u8; 16 * BS as usize], 0).expect("fill");
    let id = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(id, &SnapshotOptions::default())
        .expect("snapshot");
    v.write_at(&[4u8; 10], 0).expect("copy block 0");
    (v, id)
}

#[test]
fn a_catalog_with_the_wrong_magic_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, _) = setup(dir.path());
    // Both slots of the catalog: with one intact, the volume would (rightly) open from it.
    for slot in ["catalog.a", "catalog.b"] {
        let cat = v.state_dir().join(slot);
        let mut bytes = std::fs::read(&cat).expect("read");
        bytes[..8].copy_from_slice(b"NOTOURS!");
        std::fs::write(&cat, bytes).expect("write");
    }
    let err = Volume::open(v.path()).expect_err("wrong magic").to_string();
    assert!(
        err.contains("wrong magic") && err.contains("catalog.a"),
        "{err}"
    );
}

#[test]
fn a_truncated_map_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id) = setup(dir.path());
    let map = v.state_dir().join(format!("snap-{id}.map"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&map)
        .expect("open");
    f.set_len(20).expect("truncate");
    let fresh = Volume::open(v.path()).expect("open volume");
    let err = fresh
        .snapshot(id)
        .and_then(|s| s.read_at(&mut [0u8; 10], 0))
        .expect_err("truncated")
        .to_string();
    assert!(
        err.contains("truncated") && err.contains(&map.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_full_diff_area_invalidates_the_snapshot_but_never_fails_a_live_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v = Volume::create(&dir.path().join("vol.img"), 16 * BS as u64, BS, None).expect("create");
    let id = v.reserve_snapshot_id().expect("reserve");
    v.create_snapshot(
        id,
        &SnapshotOptions {
            diff_limit: Some(2 * BS as u64),
        },
    )
    .expect("snapshot");
    v.write_at(&[1u8; 10], 0)
        .expect("first copy within the limit");
    v.write_at(&vec![2u8; 4 * BS as usize], 4 * BS as u64)
        .expect("live write must succeed past the limit");
    let mut b = [0u8; 4];
    v.read_at(&mut b, 4 * BS as u64).expect("live read");
    assert_eq!(b, [2; 4]);
    let err = v
        .snapshot(id)
        .expect("handle")
        .read_at(&mut [0u8; 10], 0)
        .expect_err("invalid")
        .to_string();
    assert!(
        err.contains(&format!("snapshot {id} is invalid")) && err.contains("diff area full"),
        "{err}"
    );
    let infos = v.snapshots().expect("list");
    assert!(
        matches!(infos[0].state, SnapshotState::Invalid { .. }),
        "{infos:?}"
    );
    // Another process sees it too.
    let other = Volume::open(v.path()).expect("open");
    assert!(other
        .snapshot(id)
        .expect("handle")
        .read_at(&mut [0u8; 1], 8 * BS as u64)
        .is_err());
}

#[test]
fn a_torn_catalog_slot_is_used_only_when_it_held_an_unacknowledged_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id) = setup(dir.path());
    // Tear each slot in turn and open again. The older slot is the one the
    // next change writes into, so tearing it is what a crash in the middle of
    // a catalog change does: nothing acknowledged is lost. Tearing the slot
    // holding the newest, acknowledged change (the one `gen` records) must be
    // refused by name, never silently rolled back to the older generation
    // (which lacks `id`). Which file is newest depends on the generation
    // count, so both are tried.
    let mut refused = Vec::new();
    for slot in ["catalog.a", "catalog.b"] {
        let path = v.state_dir().join(slot);
        let saved = std::fs::read(&path).expect("read slot");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_len(30).expect("tear");
        drop(f);
        match Volume::open(v.path()) {
            Ok(again) => assert!(
                again.snapshots().expect("list").iter().any(|s| s.id == id),
                "tearing {slot} lost snapshot {id}"
            ),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(slot) && msg.contains("roll back") && msg.contains("volume check"),
                    "{msg}"
                );
                refused.push(slot);
            }
        }
        std::fs::write(&path, saved).expect("restore slot");
    }
    assert_eq!(
        refused.len(),
        1,
        "exactly the newest slot is refused, got {refused:?}"
    );
    Volume::open(v.path()).expect("intact again once restored");
}

#[test]
fn a_volume_shorter_than_its_catalog_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, _) = setup(dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(v.path())
        .expect("open");
    f.set_len(5000).expect("truncate");
    let err = Volume::open(v.path()).expect_err("short").to_string();
    assert_eq!(
        err,
        format!(
            "volume file {} is 5000 bytes but its catalog says {}",
            v.path().display(),
            16 * BS
        )
    );
}

#[test]
fn damaged_diff_area_data_fails_its_checksum_instead_of_being_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, id) = setup(dir.path());
    let diff = v.state_dir().join("diff.dat");
    let mut bytes = std::fs::read(&diff).expect("read");
    bytes[100] ^= 0xFF;
    std::fs::write(&diff, bytes).expect("write");
    let err = v
        .snapshot(id)
        .expect("handle")
        .read_at(&mut [0u8; 10], 0)
        .expect_err("checksum")
        .to_string();
    assert!(
        err.contains("block 0") && err.contains("fails its checksum"),
        "{err}"
    );
}

#[test]
fn a_volume_without_state_says_how_to_create_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plain.img");
    std::fs::write(&path, [0u8; 4096]).expect("write");
    let err = Volume::open(&path).expect_err("no state").to_string();
    assert!(
        err.contains("no freezeframe state") && err.contains("volume create"),
        "{err}"
    );
}

#[test]
fn garbage_catalogs_give_errors_not_panics() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().expect("tempdir");
    let (v, _) = setup(dir.path());
    let other = v.state_dir().join("catalog.a");
    std::fs::write(&other, b"").expect("empty the other slot");
    let cat = v.state_dir().join("catalog.b");
    let good = std::fs::read(&cat).expect("read");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for round in 0..200 {
        let mut b = good.clone();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..b.len());
            b[i] = rng.gen();
        }
        b.truncate(rng.gen_range(0..=b.len()));
        std::fs::write(&cat, &b).expect("write");
        if b != good {
            let err = Volume::open(v.path()).expect_err("damaged catalog accepted");
            assert!(err.to_string().contains("catalog"), "round {round}: {err}");
        }
    }
}
