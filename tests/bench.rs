//! `freezeframe bench all` in a tiny configuration (16 MiB, a few rounds): every
//! benchmark runs with its peers, and every peer's result check (its copy, restore
//! or read compared byte for byte with the source) is recorded as passed. A peer that
//! skipped its work has no passed check and fails this test; a peer whose tool is
//! missing is reported as SKIPPED with the reason. The figures themselves are not
//! asserted (timings belong to the benchmark's JSON, not to tests).

mod common;

use serde_json::Value;

/// The peers each benchmark must run and check, ours included.
const EXPECTED: &[(&str, &[&str])] = &[
    ("volume", &["ours", "xfs reflink"]),
    ("mount", &["ours", "bindfs", "dd"]),
    ("backup", &["ours", "dd copy", "restic", "borg"]),
    ("replica", &["ours", "tcp copy", "rsync"]),
    ("snapshot_3", &["ours"]),
];

/// Summary rows whose peer figure must be there when the peer ran: (peer prefix, bench, peer).
const ROW_PEERS: &[(&str, &str, &str)] = &[
    ("XFS", "volume", "xfs reflink"),
    ("dd of", "mount", "dd"),
    ("bindfs", "mount", "bindfs"),
    ("dd conv", "backup", "dd copy"),
    ("restic", "backup", "restic"),
    ("borg", "backup", "borg"),
    ("plain TCP", "replica", "tcp copy"),
    ("rsync", "replica", "rsync"),
];

#[test]
fn bench_all_runs_every_peer_and_every_peer_result_matches_its_source() {
    if !common::fuse_available() {
        eprintln!("SKIPPED: FUSE is not available (no /dev/fuse or fusermount3)");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ff-test-bench-")
        .tempdir_in("/var/tmp")
        .expect("temp dir in /var/tmp");
    let d = dir.path().to_str().expect("utf-8 path");
    let out = common::ff(&[
        "bench",
        "all",
        "--json",
        "--size",
        "16MiB",
        "--rounds",
        "3",
        "--nodes",
        "3",
        "--random-reads",
        "200",
        "--creates",
        "3",
        "--no-faults",
        "--dir",
        d,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench all printed no JSON ({e}); stderr:\n{stderr}\nstdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(
        out.status.success(),
        "bench all failed: {}\nstderr:\n{stderr}",
        doc["checks"]["failed"]
    );

    let mut unavailable = Vec::new();
    for (bench, peers) in EXPECTED {
        let b = &doc["benches"][*bench];
        assert_eq!(b["exit_ok"], true, "bench {bench} failed: {}", b["error"]);
        let checks = b["report"]["checks"]
            .as_array()
            .unwrap_or_else(|| panic!("bench {bench} recorded no result checks: {b}"));
        for peer in *peers {
            let mine: Vec<&Value> = checks.iter().filter(|c| c["peer"] == *peer).collect();
            assert!(
                !mine.is_empty(),
                "bench {bench}: no result check recorded for {peer} (did it run?)"
            );
            for c in mine {
                match c["status"].as_str() {
                    Some("passed") => {}
                    Some("unavailable") => {
                        let why = c["detail"].as_str().unwrap_or("");
                        assert!(
                            !why.is_empty(),
                            "bench {bench}: {peer} unavailable without a reason"
                        );
                        eprintln!("SKIPPED: bench {bench}, peer {peer}: {why}");
                        unavailable.push((*bench, *peer));
                    }
                    _ => panic!("bench {bench}: {peer}'s result check did not pass: {c}"),
                }
            }
        }
    }
    assert!(
        doc["checks"]["failed"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "failed checks: {}",
        doc["checks"]["failed"]
    );

    // The summary carries a figure for ours in every row with a measured value,
    // and for every peer that ran.
    let rows = doc["summary"].as_array().expect("summary rows");
    assert!(rows.len() >= 15, "summary has only {} rows", rows.len());
    for row in rows {
        let measure = row["measure"].as_str().unwrap_or("");
        if measure.starts_with("backup encryption") {
            assert_eq!(row["met"], false, "our repository has no encryption: {row}");
            continue;
        }
        assert!(row["ours"].is_number(), "no figure for ours in row {row}");
        let peer = row["peer"].as_str().unwrap_or("");
        for (prefix, bench, name) in ROW_PEERS {
            if peer.starts_with(prefix) && !unavailable.contains(&(*bench, *name)) {
                assert!(
                    row["peer_value"].is_number(),
                    "no figure for {name} in row {row}"
                );
            }
        }
        assert!(
            row["met"].is_boolean() || row["peer_value"].is_null(),
            "row {row} has a peer figure but no verdict"
        );
    }
    for key in ["cores", "memory_bytes", "kernel"] {
        assert!(!doc["machine"][key].is_null(), "machine.{key} missing");
    }
    for key in ["loadavg_before", "loadavg_after", "date"] {
        assert!(doc[key].is_string(), "{key} missing");
    }
}
