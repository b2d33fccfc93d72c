//! Issue 7: the main job, end to end, as a newcomer runs it.

mod common;

use common::*;

#[test]
fn the_demo_runs_the_whole_story_and_leaves_nothing_behind() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ff-demo-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let cluster = dir.path().join("cluster");
    let out = std::process::Command::new(exe())
        .args(["demo", "--snapshots", "3", "--dir"])
        .arg(&cluster)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("verdict: every snapshot is application-consistent"),
        "{stdout}"
    );
    // 3 snapshots × 3 nodes × 3 applications, every one consistent.
    let rows = stdout.lines().filter(|l| l.contains(" yes ")).count();
    assert_eq!(rows, 27, "{stdout}");
    assert!(!stdout.lines().any(|l| l.contains(" NO ")), "{stdout}");
    assert!(
        stdout.contains("bit-exact"),
        "the restore check ran: {stdout}"
    );
    // Every node stopped and unmounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(cluster.to_str().expect("utf-8")),
        "a mount was left behind"
    );
}
