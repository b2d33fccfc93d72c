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

/// Runs the shipped hook with `args`, configured by environment only.
fn hook(
    mountpoint: &std::path::Path,
    state: &std::path::Path,
    lease_ms: u64,
    args: &[&str],
) -> std::process::Output {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/hooks.d/10-fsfreeze");
    std::process::Command::new(script)
        .args(args)
        .env("FREEZEFRAME_FSFREEZE_MOUNTPOINT", mountpoint)
        .env("FREEZEFRAME_FSFREEZE_STATE", state)
        .env("FREEZEFRAME_LEASE_MS", lease_ms.to_string())
        .output()
        .expect("run 10-fsfreeze")
}

/// A write + fsync in a child; `false` if it has not returned within `bound`.
fn write_returns(dir: &std::path::Path, bound: std::time::Duration) -> bool {
    let mut c = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf x >> \"$1\" && sync \"$1\"")
        .arg("probe")
        .arg(dir.join("probe"))
        .spawn()
        .expect("sh");
    let deadline = std::time::Instant::now() + bound;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(st)) = c.try_wait() {
            return st.success();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Reaped when the filesystem thaws (the test thaws it before it ends).
    std::thread::spawn(move || c.wait());
    false
}

struct Mounted(std::path::PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.0)
            .output();
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn the_sample_fsfreeze_hook_is_idempotent_and_thaws_by_itself_when_the_lease_passes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !which("mkfs.ext4") || !which("fsfreeze") {
        eprintln!("SKIPPED: needs root, mkfs.ext4 and fsfreeze");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ff-hook-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .expect("img")
        .set_len(32 << 20)
        .expect("size");
    let ok = |o: std::process::Output, what: &str| {
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ok(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .output()
            .expect("mkfs"),
        "mkfs",
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    ok(
        std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .expect("mount"),
        "mount",
    );
    let _m = Mounted(mnt.clone());
    let state = dir.path().join("state");
    let short = std::time::Duration::from_millis(700);

    // Thaw and abort of a filesystem that is not frozen succeed (an abort may come first).
    ok(hook(&mnt, &state, 60_000, &["abort"]), "abort while thawed");
    ok(hook(&mnt, &state, 60_000, &["thaw"]), "thaw while thawed");
    // Freeze blocks writes; a second freeze is still success; post-snapshot changes nothing.
    ok(hook(&mnt, &state, 60_000, &["freeze"]), "freeze");
    assert!(!write_returns(&mnt, short), "a write returned while frozen");
    ok(hook(&mnt, &state, 60_000, &["freeze"]), "freeze again");
    ok(
        hook(&mnt, &state, 60_000, &["post-snapshot", "/x/volume.img"]),
        "post-snapshot",
    );
    ok(hook(&mnt, &state, 60_000, &["thaw"]), "thaw");
    assert!(
        write_returns(&mnt, std::time::Duration::from_secs(5)),
        "a write after thaw hung"
    );
    ok(hook(&mnt, &state, 60_000, &["abort"]), "abort after thaw");
    assert!(
        std::fs::read_dir(&state).map(|d| d.count()).unwrap_or(0) == 0,
        "thaw/abort leave no watchdog behind"
    );

    // Nobody thaws (the daemon died): the watchdog does, once the lease passed.
    ok(
        hook(&mnt, &state, 1_000, &["freeze"]),
        "freeze with a 1 s lease",
    );
    assert!(!write_returns(&mnt, short), "a write returned while frozen");
    assert!(
        write_returns(&mnt, std::time::Duration::from_secs(4)),
        "the filesystem stayed frozen after the lease"
    );
    // The usual undo afterwards is still success.
    ok(
        hook(&mnt, &state, 1_000, &["abort"]),
        "abort after the watchdog",
    );

    // No mount point configured: a clear error, a veto.
    let o = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/hooks.d/10-fsfreeze"),
    )
    .arg("freeze")
    .env_remove("FREEZEFRAME_FSFREEZE_MOUNTPOINT")
    .output()
    .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no mount point"));
}
