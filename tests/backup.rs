//! `freezeframe backup` end to end through the real binary: a volume made
//! and snapshotted with `freezeframe volume`, full and express-full backups,
//! list, restore bit-exact, verify, damage found and named, forget, and a
//! backup killed mid-run followed by a clean one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const BS: u64 = 16384;
const BLOCKS: u64 = 512; // 8 MiB

fn ff() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freezeframe"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    ff().args(args).output().expect("run freezeframe")
}

/// Runs and insists on success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "freezeframe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn json(args: &[&str]) -> Value {
    let text = ok(args);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("freezeframe {args:?} printed no JSON ({e}): {text}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes `data` to the live volume at `offset` through `freezeframe volume write`.
fn write(volume: &Path, offset: u64, data: &[u8]) {
    use std::io::Write;
    let mut child = ff()
        .args([
            "volume",
            "write",
            s(volume),
            "--offset",
            &offset.to_string(),
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn volume write");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("feed volume write");
    assert!(child.wait().expect("wait").success(), "volume write failed");
}

fn snapshot(volume: &Path) -> u64 {
    let out = ok(&["volume", "snapshot", s(volume)]);
    out.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .last()
        .unwrap_or_else(|| panic!("no snapshot id in {out:?}"))
}

fn snapshot_image(volume: &Path, id: u64) -> Vec<u8> {
    let out = run(&["volume", "read", s(volume), "--snapshot", &id.to_string()]);
    assert!(
        out.status.success(),
        "volume read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: deterministic, incompressible enough, no dependency.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    volume: PathBuf,
    repo: PathBuf,
}

fn world() -> World {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let volume = dir.join("volume.img");
    let repo = dir.join("repo");
    ok(&[
        "volume",
        "create",
        s(&volume),
        "--size",
        &(BS * BLOCKS).to_string(),
        "--block-size",
        "16KiB",
    ]);
    write(&volume, 0, &random((BS * BLOCKS) as usize, 1));
    ok(&["backup", "init", s(&repo)]);
    World {
        _tmp: tmp,
        dir,
        volume,
        repo,
    }
}

#[test]
fn full_then_express_full_backups_restore_bit_exact_through_the_cli() {
    let w = world();
    let s1 = snapshot(&w.volume);
    let full = json(&[
        "backup",
        "run",
        "--repo",
        s(&w.repo),
        "--volume",
        s(&w.volume),
        "--json",
    ]);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["snapshot"]["id"], s1);
    assert_eq!(full["stats"]["blocks_read"], BLOCKS);

    for (i, b) in [3u64, 100, 101, 400].iter().enumerate() {
        write(&w.volume, b * BS, &random(BS as usize, 10 + i as u64));
    }
    let s2 = snapshot(&w.volume);
    let inc = json(&[
        "backup",
        "run",
        "--repo",
        s(&w.repo),
        "--volume",
        s(&w.volume),
        "--snapshot",
        &s2.to_string(),
        "--json",
    ]);
    assert_eq!(inc["kind"], "incremental");
    assert_eq!(inc["parent"], full["id"]);
    assert_eq!(
        inc["stats"]["blocks_read"], 4,
        "only the changed blocks are read"
    );

    let list = json(&["backup", "list", "--repo", s(&w.repo), "--json"]);
    let ids: Vec<&str> = list["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids,
        vec![
            full["id"].as_str().expect("id"),
            inc["id"].as_str().expect("id")
        ]
    );

    for (b, snap) in [(&full, s1), (&inc, s2)] {
        let id = b["id"].as_str().expect("id");
        let out = w.dir.join(format!("{id}.img"));
        // A unique prefix is enough to name a backup.
        ok(&[
            "backup",
            "restore",
            "--repo",
            s(&w.repo),
            &id[..10],
            "--to",
            s(&out),
        ]);
        assert!(
            std::fs::read(&out).expect("restored") == snapshot_image(&w.volume, snap),
            "backup {id} is bit-exact"
        );
    }
    let v = json(&[
        "backup",
        "verify",
        "--repo",
        s(&w.repo),
        "--read-data",
        "--json",
    ]);
    assert_eq!(v["problems"].as_array().map(|p| p.len()), Some(0), "{v}");

    let forgot = json(&[
        "backup",
        "forget",
        "--repo",
        s(&w.repo),
        full["id"].as_str().expect("id"),
        "--json",
    ]);
    assert_eq!(forgot["forgotten"], full["id"]);
    let out = w.dir.join("after-forget.img");
    ok(&[
        "backup",
        "restore",
        "--repo",
        s(&w.repo),
        inc["id"].as_str().expect("id"),
        "--to",
        s(&out),
    ]);
    assert!(std::fs::read(&out).expect("restored") == snapshot_image(&w.volume, s2));
}

#[test]
fn a_damaged_pack_is_named_by_verify_and_fails_the_restore_loudly() {
    let w = world();
    snapshot(&w.volume);
    let full = json(&[
        "backup",
        "run",
        "--repo",
        s(&w.repo),
        "--volume",
        s(&w.volume),
        "--json",
    ]);
    let id = full["id"].as_str().expect("id");
    let pack = std::fs::read_dir(w.repo.join("packs"))
        .expect("packs")
        .next()
        .expect("a pack")
        .expect("entry")
        .path();
    let mut bytes = std::fs::read(&pack).expect("pack");
    bytes[5000] ^= 0x80;
    std::fs::write(&pack, &bytes).expect("damage pack");
    let pack_name = pack
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();

    let v = run(&["backup", "verify", "--repo", s(&w.repo), "--read-data"]);
    assert!(!v.status.success(), "verify must fail on damage");
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(
        text.contains(&pack_name) && text.contains(id) && text.contains("block(s) [0]"),
        "{text}"
    );

    let r = run(&[
        "backup",
        "restore",
        "--repo",
        s(&w.repo),
        id,
        "--to",
        s(&w.dir.join("x.img")),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains(id)
            && err.contains("block 0")
            && err.contains(&pack_name)
            && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let w = world();
    let no_snap = run(&[
        "backup",
        "run",
        "--repo",
        s(&w.repo),
        "--volume",
        s(&w.volume),
    ]);
    assert!(!no_snap.status.success());
    assert!(String::from_utf8_lossy(&no_snap.stderr).contains("no complete (sealed) snapshot"));
    let bad = run(&[
        "backup",
        "run",
        "--repo",
        s(&w.repo),
        "--volume",
        s(&w.volume),
        "--snapshot",
        "seven",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected a snapshot id or `latest`"));
    let nothing = run(&["backup", "list", "--repo", s(&w.dir)]);
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("no backup repository at"));
    let missing = run(&[
        "backup",
        "restore",
        "--repo",
        s(&w.repo),
        "feedface",
        "--to",
        s(&w.dir.join("y.img")),
    ]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no backup feedface"));
}

#[test]
fn a_killed_backup_run_is_followed_by_a_clean_one() {
    let w = world();
    snapshot(&w.volume);
    for round in 0..6u64 {
        write(
            &w.volume,
            (round * 37 % BLOCKS) * BS,
            &random(BS as usize * 8, 100 + round),
        );
        snapshot(&w.volume);
        let mut child = ff()
            .args([
                "backup",
                "run",
                "--repo",
                s(&w.repo),
                "--volume",
                s(&w.volume),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn backup");
        std::thread::sleep(Duration::from_millis(round * 7));
        let _ = child.kill();
        child.wait().expect("reap");
        let m = json(&[
            "backup",
            "run",
            "--repo",
            s(&w.repo),
            "--volume",
            s(&w.volume),
            "--json",
        ]);
        let out = w.dir.join("r.img");
        let _ = std::fs::remove_file(&out);
        ok(&[
            "backup",
            "restore",
            "--repo",
            s(&w.repo),
            m["id"].as_str().expect("id"),
            "--to",
            s(&out),
        ]);
        let snap = m["snapshot"]["id"].as_u64().expect("snapshot id");
        assert!(
            std::fs::read(&out).expect("restored") == snapshot_image(&w.volume, snap),
            "round {round}"
        );
        let v = json(&["backup", "verify", "--repo", s(&w.repo), "--json"]);
        assert_eq!(
            v["problems"].as_array().map(|p| p.len()),
            Some(0),
            "round {round}: {v}"
        );
    }
}
