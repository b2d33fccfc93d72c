//! Damage in the repository is found and named: verify reports the pack,
//! backup and block; restore of an affected backup fails loudly while the
//! unaffected ones still restore bit-exact.

mod backup_support;

use backup_support::{read_image, TestVolume};
use freezeframe_core::backup::{NoProgress, Repository};
use freezeframe_core::Error;

const MIB: u64 = 1 << 20;

/// Two volumes with nothing in common, one backup each, so damage to one
/// volume's data affects only that volume's backup.
fn two_backups(dir: &std::path::Path) -> (Repository, TestVolume, String, TestVolume, String) {
    let repo = Repository::init(&dir.join("repo"), MIB).expect("init");
    let mut a = TestVolume::random("vol-a", 4096, 128, 11);
    let mut b = TestVolume::random("vol-b", 4096, 128, 12);
    let sa = a.snapshot();
    let sb = b.snapshot();
    let ma = repo.backup(&a.source(sa), &NoProgress).expect("backup a");
    let mb = repo.backup(&b.source(sb), &NoProgress).expect("backup b");
    (repo, a, ma.header.id, b, mb.header.id)
}

fn packs(repo: &Repository) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(repo.root().join("packs"))
        .expect("packs dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    v.sort();
    v
}

#[test]
fn one_flipped_byte_in_a_pack_is_named_by_verify_and_fails_only_the_affected_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (repo, a, id_a, b, id_b) = two_backups(tmp.path());
    // Each backup wrote its own pack(s); find the one holding block 1 of volume a.
    let block1 = &a.image(1)[4096..8192];
    let (pack, at) = packs(&repo)
        .into_iter()
        .find_map(|p| {
            let bytes = std::fs::read(&p).expect("read pack");
            bytes
                .windows(4096)
                .position(|w| w == block1)
                .map(|i| (p, i))
        })
        .expect("block 1 of volume a is in some pack");
    let mut bytes = std::fs::read(&pack).expect("read pack");
    bytes[at + 100] ^= 0x01;
    std::fs::write(&pack, &bytes).expect("write damaged pack");

    let quick = repo.verify(false, &NoProgress).expect("verify");
    assert!(
        quick.is_clean(),
        "without --read-data the structure is still fine: {:?}",
        quick.problems
    );
    let report = repo.verify(true, &NoProgress).expect("verify --read-data");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(p.path, pack);
    assert_eq!(p.backups, vec![id_a.clone()]);
    assert_eq!(p.blocks, vec![(id_a.clone(), vec![1])]);
    let pack_name = pack
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        p.message.contains(&pack_name) && p.message.contains(&id_a) && p.message.contains("[1]"),
        "{}",
        p.message
    );

    let err = repo
        .restore(&id_a, &tmp.path().join("a.img"), &NoProgress)
        .expect_err("affected backup must fail");
    match &err {
        Error::BlockCorrupt {
            backup,
            block,
            pack: in_pack,
            ..
        } => {
            assert_eq!(
                (backup.as_str(), *block, in_pack),
                (id_a.as_str(), 1, &pack)
            );
        }
        other => panic!("expected BlockCorrupt, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&id_a) && msg.contains("block 1") && msg.contains(&pack_name),
        "{msg}"
    );

    let out = tmp.path().join("b.img");
    repo.restore(&id_b, &out, &NoProgress)
        .expect("unaffected backup restores");
    assert!(read_image(&out) == b.image(1));
}

#[test]
fn a_damaged_manifest_is_refused_with_its_file_name_and_others_still_list() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (repo, _a, id_a, _b, id_b) = two_backups(tmp.path());
    let path = repo.root().join("backups").join(format!("{id_a}.backup"));
    let mut bytes = std::fs::read(&path).expect("manifest");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");

    let err = repo
        .restore(&id_a, &tmp.path().join("a.img"), &NoProgress)
        .expect_err("damaged manifest");
    assert!(
        matches!(&err, Error::RepoCorrupt { path: p, .. } if *p == path),
        "{err}"
    );
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    let listing = repo.list().expect("list");
    assert_eq!(
        listing
            .backups
            .iter()
            .map(|h| h.id.clone())
            .collect::<Vec<_>>(),
        vec![id_b]
    );
    assert_eq!(listing.unreadable.len(), 1);
    let report = repo.verify(false, &NoProgress).expect("verify");
    assert!(
        report.problems.iter().any(|p| p.path == path),
        "{:?}",
        report.problems
    );
    let gc = repo
        .gc()
        .expect_err("gc must not guess what a damaged backup needs");
    assert!(gc.to_string().contains("will not run"), "{gc}");
}

#[test]
fn a_damaged_index_file_is_reported_and_the_next_backup_stores_the_data_again() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = Repository::init(&tmp.path().join("repo"), MIB).expect("init");
    let mut a = TestVolume::random("vol-a", 4096, 64, 13);
    let s1 = a.snapshot();
    let first = repo.backup(&a.source(s1), &NoProgress).expect("backup");
    let idx = std::fs::read_dir(repo.root().join("index"))
        .expect("index dir")
        .next()
        .expect("one index")
        .expect("entry")
        .path();
    let mut bytes = std::fs::read(&idx).expect("index");
    bytes[30] ^= 0x40;
    std::fs::write(&idx, &bytes).expect("write");

    let report = repo.verify(false, &NoProgress).expect("verify");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.path == idx && p.message.contains("checksum")),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.backups == vec![first.header.id.clone()]),
        "{:?}",
        report.problems
    );

    // Express-full would reuse every hash; the ones the index lost are read again.
    a.change_random_blocks(1);
    let s2 = a.snapshot();
    let m = repo
        .backup(&a.source(s2), &NoProgress)
        .expect("backup repairs");
    assert!(
        m.header.stats.blocks_read > 1,
        "blocks with no indexed data were re-read"
    );
    let out = tmp.path().join("a.img");
    repo.restore(&m.header.id, &out, &NoProgress)
        .expect("restore");
    assert!(read_image(&out) == a.image(s2));
}
