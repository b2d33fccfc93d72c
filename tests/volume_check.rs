//! `freezeframe volume check` end to end (issue 12): after one flipped byte in
//! the newest catalog slot every command fails naming the slot; `check`
//! explains and exits non-zero without changing anything; `check --repair`
//! says what is lost, and the volume works again with nothing rolled back
//! silently (the snapshot sealed in the lost generation is Invalid, not Open).

mod common;

use common::{ff, ff_json};

fn ok(args: &[&str]) -> String {
    let out = ff(args);
    assert!(
        out.status.success(),
        "freezeframe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_damaged_catalog_is_explained_by_check_and_recovered_only_by_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.img");
    let v = vol.to_str().expect("utf-8 path");
    ok(&[
        "volume",
        "create",
        v,
        "--size",
        "1MiB",
        "--block-size",
        "4KiB",
    ]);
    let first = ok(&["volume", "snapshot", v]).trim().to_string();
    let second = ok(&["volume", "snapshot", v]).trim().to_string();
    // The newest slot holds the seal of `second`; flip one byte of its payload.
    let state = dir.path().join("vol.img.ffstate");
    let newest = ["catalog.a", "catalog.b"]
        .into_iter()
        .max_by_key(|s| {
            let b = std::fs::read(state.join(s)).unwrap_or_default();
            freezeframe_core::volume::decode::catalog_slot(&b)
                .map(|(g, _)| g)
                .unwrap_or(0)
        })
        .expect("a slot");
    let path = state.join(newest);
    let mut bytes = std::fs::read(&path).expect("read slot");
    bytes[30] ^= 0x08;
    std::fs::write(&path, &bytes).expect("write slot");

    let out = ff(&["volume", "snapshots", v]);
    assert!(
        !out.status.success(),
        "listing a rolled-back catalog must fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(newest) && err.contains("volume check"),
        "{err}"
    );

    let out = ff(&["volume", "check", v]);
    assert!(!out.status.success(), "check exits non-zero on damage");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DAMAGED") && text.contains(newest), "{text}");
    assert!(
        std::fs::read(&path).expect("read") == bytes,
        "check alone changes nothing"
    );

    let report = ff_json(&["volume", "check", v, "--repair", "--json"]);
    let repaired = report["repaired"].as_array().expect("repaired list");
    assert!(
        repaired.iter().any(|r| r
            .as_str()
            .unwrap_or("")
            .contains(&format!("snapshot {second} marked INVALID"))),
        "{report}"
    );

    let list = ff_json(&["volume", "snapshots", v, "--json"]);
    let state_of = |id: &str| {
        let id: u64 = id.parse().expect("id");
        list.as_array()
            .expect("array")
            .iter()
            .find(|s| s["id"].as_u64() == Some(id))
            .map(|s| s["state"]["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(state_of(&first).as_deref(), Some("sealed"));
    assert_eq!(state_of(&second).as_deref(), Some("invalid"));
    ok(&["volume", "check", v]);
    let third: u64 = ok(&["volume", "snapshot", v]).trim().parse().expect("id");
    assert!(
        third > second.parse::<u64>().expect("id"),
        "ids are never reused"
    );
}

#[test]
fn diff_max_is_shown_and_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.img");
    let v = vol.to_str().expect("utf-8 path");
    ok(&[
        "volume",
        "create",
        v,
        "--size",
        "1MiB",
        "--block-size",
        "4KiB",
    ]);
    assert_eq!(ok(&["volume", "diff-max", v]).trim(), "diff_max none");
    assert!(ok(&["volume", "diff-max", v, "64KiB"]).contains("64"));
    assert!(ok(&["volume", "diff-max", v]).contains("64"));
    assert_eq!(
        ok(&["volume", "diff-max", v, "none"]).trim(),
        "diff_max none"
    );
}
