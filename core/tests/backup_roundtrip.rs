//! Backups round trip (seeds 002 and 004): a full backup, then express-full
//! incrementals that read only changed blocks, each restoring bit-exact;
//! identical data across snapshots and volumes stored once.

mod backup_support;

use backup_support::{pack_bytes, read_image, State, TestVolume};
use freezeframe_core::backup::{BackupKind, NoProgress, Repository};
use freezeframe_core::Error;

const MIB: u64 = 1 << 20;

fn repo(dir: &std::path::Path) -> Repository {
    Repository::init(&dir.join("repo"), MIB).expect("init repository")
}

#[test]
fn full_then_incrementals_restore_every_backup_bit_exact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    // 700 blocks of 4 KiB plus a short last block: about 2.8 MiB, several packs.
    let mut vol = TestVolume::random("vol-a", 4096, 700, 1);
    vol.data.extend_from_slice(&[7u8; 1000]);

    let mut backups = Vec::new();
    let first = vol.snapshot();
    let m = repo
        .backup(&vol.source(first), &NoProgress)
        .expect("full backup");
    assert_eq!(m.header.kind, BackupKind::Full { reason: None });
    assert_eq!(
        m.header.stats.blocks_read,
        vol.blocks(),
        "a first backup reads every block"
    );
    backups.push((m.header.id.clone(), first));

    for round in 0..4 {
        let changed = vol.change_random_blocks(20 + round * 10);
        let snap = vol.snapshot();
        let m = repo
            .backup(&vol.source(snap), &NoProgress)
            .expect("incremental backup");
        let mut distinct = changed.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            matches!(m.header.kind, BackupKind::Incremental { .. }),
            "round {round}: {:?}",
            m.header.kind
        );
        assert_eq!(
            m.header.stats.blocks_read,
            distinct.len() as u64,
            "round {round}: only changed blocks are read"
        );
        backups.push((m.header.id.clone(), snap));
    }

    for (id, snap) in &backups {
        let out = tmp.path().join(format!("restore-{id}.img"));
        let r = repo.restore(id, &out, &NoProgress).expect("restore");
        assert_eq!(r.image_size, vol.image(*snap).len() as u64);
        assert!(
            read_image(&out) == vol.image(*snap),
            "backup {id} of snapshot {snap} restores bit-exact"
        );
    }
    let report = repo.verify(true, &NoProgress).expect("verify runs");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(repo.list().expect("list").backups.len(), 5);
}

#[test]
fn forgetting_the_full_backup_keeps_later_incrementals_whole_and_frees_space() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    let mut vol = TestVolume::random("vol-a", 8192, 300, 2);
    let s1 = vol.snapshot();
    let full = repo.backup(&vol.source(s1), &NoProgress).expect("full");
    // Rewrite most of the volume so the full backup's data becomes mostly garbage.
    vol.change_random_blocks(600);
    let s2 = vol.snapshot();
    let inc = repo
        .backup(&vol.source(s2), &NoProgress)
        .expect("incremental");
    let before = pack_bytes(repo.root());

    let gc = repo
        .forget(&full.header.id)
        .expect("forget the full backup");
    assert_eq!(gc.forgotten.as_deref(), Some(full.header.id.as_str()));
    assert!(pack_bytes(repo.root()) < before, "gc freed space: {gc:?}");
    let out = tmp.path().join("inc.img");
    repo.restore(&inc.header.id, &out, &NoProgress)
        .expect("restore incremental after its base is gone");
    assert!(read_image(&out) == vol.image(s2));
    assert!(repo.verify(true, &NoProgress).expect("verify").is_clean());
    let err = repo
        .restore(&full.header.id, &tmp.path().join("x.img"), &NoProgress)
        .expect_err("forgotten");
    assert!(matches!(err, Error::BackupNotFound { .. }), "{err}");
}

#[test]
fn identical_content_on_two_volumes_is_stored_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    let a = TestVolume::random("vol-a", 16384, 256, 3);
    // Volume b is a copy of a with a few blocks of its own.
    let mut b = TestVolume::random("vol-b", 16384, 256, 4);
    b.data = a.data.clone();
    let mut a = a;
    let sa = a.snapshot();
    b.change_random_blocks(4);
    let sb = b.snapshot();

    repo.backup(&a.source(sa), &NoProgress).expect("backup a");
    let after_a = pack_bytes(repo.root());
    let mb = repo.backup(&b.source(sb), &NoProgress).expect("backup b");
    let growth = pack_bytes(repo.root()) - after_a;
    assert!(
        growth <= 4 * 16384 + 4096,
        "second volume added {growth} bytes, expected at most its 4 own blocks"
    );
    assert_eq!(
        mb.header.kind,
        BackupKind::Full { reason: None },
        "another volume starts with a full backup"
    );
    assert!(mb.header.stats.blocks_stored <= 4);

    let out = tmp.path().join("b.img");
    repo.restore(&mb.header.id, &out, &NoProgress)
        .expect("restore b");
    assert!(read_image(&out) == b.image(sb));
}

#[test]
fn zero_blocks_and_repeats_are_not_stored_and_restore_as_holes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    let mut vol = TestVolume::random("sparse", 4096, 512, 5);
    vol.data.fill(0);
    let block = vec![0x5au8; 4096];
    for b in [3u64, 100, 200, 300] {
        vol.write_block(b, &block);
    }
    let s = vol.snapshot();
    let m = repo.backup(&vol.source(s), &NoProgress).expect("backup");
    assert_eq!(m.header.stats.blocks_zero, 508);
    assert_eq!(
        m.header.stats.blocks_stored, 1,
        "four identical blocks are one blob"
    );
    let out = tmp.path().join("sparse.img");
    repo.restore(&m.header.id, &out, &NoProgress)
        .expect("restore");
    assert!(read_image(&out) == vol.image(s));
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).expect("stat").blocks() * 512;
    assert!(
        allocated < 512 * 1024,
        "restored image is sparse ({allocated} bytes allocated)"
    );
}

#[test]
fn a_deleted_previous_snapshot_falls_back_to_a_full_backup_and_says_why() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    let mut vol = TestVolume::random("vol-a", 4096, 200, 6);
    let s1 = vol.snapshot();
    repo.backup(&vol.source(s1), &NoProgress).expect("full");
    vol.change_random_blocks(5);
    let s2 = vol.snapshot();
    vol.snapshots.remove(&s1);
    let m = repo
        .backup(&vol.source(s2), &NoProgress)
        .expect("backup after the base snapshot was deleted");
    match &m.header.kind {
        BackupKind::Full { reason: Some(r) } => {
            assert!(r.contains("no longer in the catalog"), "{r}")
        }
        other => panic!("expected a full backup with a reason, got {other:?}"),
    }
    assert_eq!(m.header.stats.blocks_read, vol.blocks());
    assert!(
        m.header.stats.blocks_stored <= 5,
        "unchanged blocks are still deduplicated"
    );
}

#[test]
fn open_and_invalid_snapshots_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    let mut vol = TestVolume::random("vol-a", 4096, 16, 7);
    let s = vol.snapshot();
    let mut open = vol.source(s);
    open.state = State::Open;
    let err = repo.backup(&open, &NoProgress).expect_err("open snapshot");
    assert!(err.to_string().contains("still open"), "{err}");
    let mut invalid = vol.source(s);
    invalid.state = State::Invalid("diff area full".into());
    let err = repo
        .backup(&invalid, &NoProgress)
        .expect_err("invalid snapshot");
    assert!(
        matches!(err, Error::SnapshotNotBackupable { snapshot, .. } if snapshot == s),
        "{err}"
    );
    assert!(err.to_string().contains("diff area full"), "{err}");
    assert!(
        repo.list().expect("list").backups.is_empty(),
        "nothing was recorded"
    );
}

#[test]
fn a_second_writer_is_refused_while_the_lock_is_held() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    let lock = std::fs::File::open(repo.root().join("lock")).expect("lock file");
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file we own.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let mut vol = TestVolume::random("vol-a", 4096, 16, 8);
    let s = vol.snapshot();
    let err = repo
        .backup(&vol.source(s), &NoProgress)
        .expect_err("locked");
    assert!(matches!(err, Error::RepoLocked { .. }), "{err}");
}

#[test]
fn init_refuses_an_existing_repository_and_open_refuses_a_plain_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = repo(tmp.path());
    let err = Repository::init(r.root(), MIB).expect_err("second init");
    assert!(
        err.to_string()
            .contains("already holds a backup repository"),
        "{err}"
    );
    let err = Repository::open(tmp.path()).expect_err("not a repository");
    assert!(matches!(err, Error::RepoNotFound { .. }), "{err}");
}

#[test]
fn a_damaged_last_manifest_means_a_full_backup_not_a_failure() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    let mut vol = TestVolume::random("vol-a", 4096, 64, 9);
    let s1 = vol.snapshot();
    let first = repo.backup(&vol.source(s1), &NoProgress).expect("full");
    let path = repo
        .root()
        .join("backups")
        .join(format!("{}.backup", first.header.id));
    let mut bytes = std::fs::read(&path).expect("manifest");
    let last = bytes.len() - 40;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).expect("damage manifest");

    vol.change_random_blocks(3);
    let s2 = vol.snapshot();
    let m = repo
        .backup(&vol.source(s2), &NoProgress)
        .expect("backup despite the damaged manifest");
    match &m.header.kind {
        BackupKind::Full { reason: Some(r) } => assert!(
            r.contains(&first.header.id) && r.contains("unreadable"),
            "{r}"
        ),
        other => panic!("expected a full backup with its reason, got {other:?}"),
    }
    let out = tmp.path().join("s2.img");
    repo.restore(&m.header.id, &out, &NoProgress)
        .expect("restore");
    assert!(read_image(&out) == vol.image(s2));
}

#[test]
fn gc_run_again_after_dying_between_copy_and_delete_keeps_every_live_block() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = repo(tmp.path());
    // 100 blocks fit in one pack; after the change half of it is garbage.
    let mut vol = TestVolume::random("vol-a", 4096, 100, 10);
    let s1 = vol.snapshot();
    let full = repo.backup(&vol.source(s1), &NoProgress).expect("full");
    for b in 0..50u64 {
        vol.write_block(b, &[b as u8 + 1; 4096]);
    }
    let s2 = vol.snapshot();
    let inc = repo
        .backup(&vol.source(s2), &NoProgress)
        .expect("incremental");
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = ["packs", "index"]
        .iter()
        .flat_map(|d| std::fs::read_dir(repo.root().join(d)).expect("dir"))
        .map(|e| e.expect("entry").path())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read");
            (p, bytes)
        })
        .collect();

    let gc = repo.forget(&full.header.id).expect("forget");
    assert_eq!(gc.packs_rewritten, 1, "{gc:?}");
    // As if gc had died after writing the copy but before deleting the original.
    for (p, bytes) in &saved {
        if !p.exists() {
            std::fs::write(p, bytes).expect("put the original back");
        }
    }
    repo.gc().expect("gc again");
    let out = tmp.path().join("inc.img");
    repo.restore(&inc.header.id, &out, &NoProgress)
        .expect("restore after two gcs");
    assert!(read_image(&out) == vol.image(s2));
    let report = repo.verify(true, &NoProgress).expect("verify");
    assert!(report.is_clean() && report.notes.is_empty(), "{report:?}");
}
