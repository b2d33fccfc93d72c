//! Express-full backups of the volume engine's snapshots (seed 002): the
//! changed-block list comes from the diff area, open and invalid snapshots
//! are refused, a deleted base snapshot means a full backup.

use freezeframe_core::backup::{BackupKind, NoProgress, Repository, VolumeSnapshotSource};
use freezeframe_core::volume::{SnapshotOptions, Volume};
use freezeframe_core::Error;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const BS: u32 = 16384;
const BLOCKS: u64 = 256; // 4 MiB

struct Setup {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    vol: Volume,
    repo: Repository,
    rng: StdRng,
}

fn setup(seed: u64) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let vol = Volume::create(&dir.join("volume.img"), BLOCKS * u64::from(BS), BS, None)
        .expect("create volume");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; (BLOCKS * u64::from(BS)) as usize];
    rng.fill_bytes(&mut data);
    vol.write_at(&data, 0).expect("fill volume");
    let repo = Repository::init(&dir.join("repo"), 1 << 20).expect("init repo");
    Setup {
        _tmp: tmp,
        dir,
        vol,
        repo,
        rng,
    }
}

fn snapshot(vol: &Volume) -> u64 {
    let id = vol.reserve_snapshot_id().expect("reserve id");
    vol.create_snapshot(id, &SnapshotOptions { diff_limit: None })
        .expect("create snapshot");
    vol.seal_snapshot(id).expect("seal snapshot");
    id
}

fn snapshot_image(vol: &Volume, id: u64) -> Vec<u8> {
    let snap = vol.snapshot(id).expect("snapshot");
    let mut buf = vec![0u8; snap.size() as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = snap
            .read_at(&mut buf[done..], done as u64)
            .expect("read snapshot");
        assert!(n > 0, "snapshot ended early");
        done += n;
    }
    buf
}

/// Rewrites `n` random blocks of the live volume; returns the distinct blocks.
fn change(s: &mut Setup, n: usize) -> Vec<u64> {
    let mut blocks = Vec::new();
    let mut buf = vec![0u8; BS as usize];
    for _ in 0..n {
        let b = s.rng.gen_range(0..BLOCKS);
        s.rng.fill_bytes(&mut buf);
        s.vol.write_at(&buf, b * u64::from(BS)).expect("write");
        blocks.push(b);
    }
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

#[test]
fn incrementals_read_only_the_blocks_the_diff_area_lists_and_restore_exact() {
    let mut s = setup(21);
    let s1 = snapshot(&s.vol);
    let full = s
        .repo
        .backup(
            &VolumeSnapshotSource::new(&s.vol, Some(s1)).expect("source"),
            &NoProgress,
        )
        .expect("full");
    assert_eq!(full.header.stats.blocks_read, BLOCKS);
    let mut taken = vec![(full.header.id.clone(), s1, snapshot_image(&s.vol, s1))];

    for round in 0..3 {
        let changed = change(&mut s, 12);
        let id = snapshot(&s.vol);
        // `None` picks the newest sealed snapshot.
        let src = VolumeSnapshotSource::new(&s.vol, None).expect("latest");
        assert_eq!(src.info().id, id);
        let m = s.repo.backup(&src, &NoProgress).expect("incremental");
        assert!(
            matches!(m.header.kind, BackupKind::Incremental { .. }),
            "round {round}: {:?}",
            m.header.kind
        );
        assert_eq!(
            m.header.stats.blocks_read,
            changed.len() as u64,
            "round {round}: read exactly the changed blocks"
        );
        taken.push((m.header.id.clone(), id, snapshot_image(&s.vol, id)));
    }
    for (backup, snap, image) in &taken {
        let out = s.dir.join(format!("{backup}.img"));
        s.repo.restore(backup, &out, &NoProgress).expect("restore");
        assert!(
            std::fs::read(&out).expect("restored") == *image,
            "backup {backup} of snapshot {snap} is bit-exact"
        );
    }
}

#[test]
fn an_open_snapshot_is_refused_and_a_deleted_base_means_a_full_backup() {
    let mut s = setup(22);
    let s1 = snapshot(&s.vol);
    s.repo
        .backup(
            &VolumeSnapshotSource::new(&s.vol, Some(s1)).expect("source"),
            &NoProgress,
        )
        .expect("full");

    let open = s.vol.reserve_snapshot_id().expect("reserve");
    s.vol
        .create_snapshot(open, &SnapshotOptions { diff_limit: None })
        .expect("create open snapshot");
    let err = s
        .repo
        .backup(
            &VolumeSnapshotSource::new(&s.vol, Some(open)).expect("source"),
            &NoProgress,
        )
        .expect_err("open");
    assert!(
        matches!(err, Error::SnapshotNotBackupable { snapshot, .. } if snapshot == open),
        "{err}"
    );
    assert!(err.to_string().contains("still open"), "{err}");
    s.vol.seal_snapshot(open).expect("seal");

    change(&mut s, 5);
    let s3 = snapshot(&s.vol);
    s.vol
        .delete_snapshot(s1)
        .expect("delete the backed-up snapshot");
    s.vol.delete_snapshot(open).expect("delete");
    let m = s
        .repo
        .backup(
            &VolumeSnapshotSource::new(&s.vol, Some(s3)).expect("source"),
            &NoProgress,
        )
        .expect("backup");
    match &m.header.kind {
        BackupKind::Full { reason: Some(r) } => {
            assert!(r.contains("no longer in the volume's catalog"), "{r}")
        }
        other => panic!("expected a full backup with its reason, got {other:?}"),
    }
    let out = s.dir.join("s3.img");
    s.repo
        .restore(&m.header.id, &out, &NoProgress)
        .expect("restore");
    assert!(std::fs::read(&out).expect("restored") == snapshot_image(&s.vol, s3));
}

#[test]
fn an_invalid_snapshot_is_refused() {
    let mut s = setup(23);
    let id = s.vol.reserve_snapshot_id().expect("reserve");
    // A diff-area limit of two blocks, then many overwrites: the engine marks it invalid.
    s.vol
        .create_snapshot(
            id,
            &SnapshotOptions {
                diff_limit: Some(2 * u64::from(BS)),
            },
        )
        .expect("create");
    s.vol.seal_snapshot(id).expect("seal");
    change(&mut s, 40);
    let src = VolumeSnapshotSource::new(&s.vol, Some(id)).expect("source");
    let err = s
        .repo
        .backup(&src, &NoProgress)
        .expect_err("invalid snapshot");
    assert!(matches!(err, Error::SnapshotNotBackupable { .. }), "{err}");
    assert!(err.to_string().contains("invalid"), "{err}");
    assert!(s.repo.list().expect("list").backups.is_empty());
}
