//! The fault matrix in CI: a seeded subset of `freezeframe bench faults` that
//! covers every fault, every phase and both roles, each cell on a fresh
//! 3-node cluster with an ext4 per node frozen by the shipped fsfreeze hook
//! and a writer per node (see `src/bench/faults.rs` for what a cell does and
//! asserts). The bench is the engine; this test runs it, writes the matrix it
//! printed to `target/fault-matrix.md`, and fails naming every cell that did.
//!
//! `FREEZEFRAME_FAULTS_SEED=N` draws another subset; `freezeframe bench faults
//! --all` runs every cell.

mod common;

use common::{exe, fuse_available};
use serde_json::Value;

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

#[test]
fn no_fault_in_any_phase_leaves_a_writer_or_filesystem_frozen_or_a_snapshot_half_taken() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the fault matrix loop-mounts and freezes ext4: needs root");
        return;
    }
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3)");
        return;
    }
    for cmd in ["mkfs.ext4", "fsfreeze", "mount"] {
        if !which(cmd) {
            eprintln!("SKIPPED: {cmd} is missing (test.sh installs it)");
            return;
        }
    }
    let seed = std::env::var("FREEZEFRAME_FAULTS_SEED").unwrap_or_else(|_| "1".into());
    let out = std::process::Command::new(exe())
        .args(["bench", "faults", "--json", "--seed", &seed])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run freezeframe bench faults");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench faults printed no JSON ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let cells = doc["cells"].as_array().expect("cells");
    let run: Vec<&Value> = cells.iter().filter(|c| c["result"] != "n/a").collect();
    // The subset covers every fault and every phase (the bench's contract with CI).
    for fault in ["kill", "stop", "cut", "veto", "slow_hook"] {
        assert!(
            run.iter().any(|c| c["fault"] == fault),
            "no cell for {fault}"
        );
    }
    for phase in [
        "freezing",
        "frozen",
        "committing",
        "post_snapshot",
        "thawing",
    ] {
        assert!(
            run.iter().any(|c| c["phase"] == phase),
            "no cell in {phase}"
        );
    }
    let mut table = format!(
        "fault matrix, seed {seed}, lease {} ms, {:.0} s\n\n",
        doc["lease_ms"],
        doc["seconds"].as_f64().unwrap_or(0.0)
    );
    table += "| role | phase | fault | result | seconds | reason |\n|---|---|---|---|---|---|\n";
    for c in &run {
        table += &format!(
            "| {} | {} | {} | {} | {:.1} | {} |\n",
            c["role"].as_str().unwrap_or("?"),
            c["phase"].as_str().unwrap_or("?"),
            c["fault"].as_str().unwrap_or("?"),
            c["result"].as_str().unwrap_or("?"),
            c["seconds"].as_f64().unwrap_or(0.0),
            c["reason"].as_str().unwrap_or("")
        );
    }
    eprintln!("{table}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-matrix.md");
    let _ = std::fs::write(&path, &table);
    for c in run.iter().filter(|c| c["result"] == "skipped") {
        eprintln!(
            "SKIPPED: cell {}:{}:{}: {}",
            c["role"].as_str().unwrap_or("?"),
            c["phase"].as_str().unwrap_or("?"),
            c["fault"].as_str().unwrap_or("?"),
            c["reason"].as_str().unwrap_or("")
        );
    }
    let failed: Vec<String> = run
        .iter()
        .filter(|c| c["result"] == "fail")
        .map(|c| {
            format!(
                "{}:{}:{}: {}",
                c["role"].as_str().unwrap_or("?"),
                c["phase"].as_str().unwrap_or("?"),
                c["fault"].as_str().unwrap_or("?"),
                c["problems"]
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} cells of the fault matrix failed:\n{}\n(stderr of the bench:\n{})",
        failed.len(),
        failed.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "bench faults failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
