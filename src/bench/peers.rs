//! Result checks of benchmark peers: a peer's time only counts when the peer did
//! its work, proved by comparing what it produced (a copy, a restore, the bytes it
//! read) with the source, byte for byte (blake3), after every run.
//!
//! Every benchmark records one check per peer run, ours included, in its JSON under
//! `"checks"`: `{"peer", "check", "status": "passed"|"failed"|"unavailable", "detail"}`.
//! A failed check replaces the peer's figures with an `"error"`, never a time, and
//! makes the benchmark exit with an error after printing its JSON; `unavailable`
//! means the peer tool (or kernel feature) is missing and says how to get it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// The checks of one benchmark run.
#[derive(Default)]
pub struct Checks(Vec<Value>);

impl Checks {
    /// Records the outcome of `peer`'s check (`what` says how it was checked);
    /// returns whether it passed.
    pub fn record(&mut self, peer: &str, what: &str, outcome: Result<(), String>) -> bool {
        let passed = outcome.is_ok();
        self.0.push(json!({
            "peer": peer,
            "check": what,
            "status": if passed { "passed" } else { "failed" },
            "detail": outcome.err(),
        }));
        if !passed {
            eprintln!("bench: {peer}: result check FAILED ({what})");
        }
        passed
    }

    /// Records that `peer` could not run, and why (a missing tool, not root, ...).
    pub fn unavailable(&mut self, peer: &str, reason: &str) {
        eprintln!("bench: {peer} skipped: {reason}");
        self.0.push(json!({
            "peer": peer,
            "check": Value::Null,
            "status": "unavailable",
            "detail": reason,
        }));
    }

    pub fn json(&self) -> Value {
        Value::Array(self.0.clone())
    }

    /// An error naming every failed check, if any: the benchmark's exit status.
    pub fn verdict(&self) -> Result<()> {
        let failed: Vec<String> = self
            .0
            .iter()
            .filter(|c| c["status"] == "failed")
            .map(|c| format!("{} ({})", c["peer"].as_str().unwrap_or("?"), c["detail"]))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("peer result checks failed: {}", failed.join("; "))
        }
    }
}

/// The figures of a peer whose check passed, or an error in their place.
pub fn figures(passed: bool, figures: Value, what_failed: &str) -> Value {
    if passed {
        figures
    } else {
        json!({ "error": format!("result check failed: {what_failed}; no time reported") })
    }
}

/// Compares two hashes; the error says which side is which.
pub fn same(got: &blake3::Hash, want: &blake3::Hash, of: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{of}: blake3 {} differs from the source's {}",
            &got.to_hex()[..16],
            &want.to_hex()[..16]
        ))
    }
}

/// blake3 of a whole file.
pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    hash_reader(f).with_context(|| format!("read {}", path.display()))
}

/// blake3 of everything a reader yields, and how many bytes that was.
pub fn hash_reader(mut r: impl Read) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// Where `name` is on PATH, or why the peer is unavailable (with its Debian package).
pub fn tool(name: &str, package: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), "/sbin".into()]) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "{name} is not installed (Debian: apt-get install {package})"
    ))
}

/// /proc/loadavg's first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether this process runs as root (mounts, loop devices, dropping caches).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_result_check_replaces_the_figures_with_an_error_and_fails_the_run() {
        let mut checks = Checks::default();
        let src = blake3::hash(b"source bytes");
        assert!(checks.record("tcp copy", "hash", same(&src, &src, "copy")));
        let ok = checks.record(
            "rsync",
            "hash",
            same(&blake3::hash(b"stale copy"), &src, "rsync's copy"),
        );
        assert!(!ok);
        let fig = figures(ok, json!({"seconds": 0.047}), "rsync's copy differs");
        assert!(
            fig.get("seconds").is_none(),
            "a time survived a failed check: {fig}"
        );
        let error = fig["error"]
            .as_str()
            .expect("an error in place of the figures");
        assert!(error.contains("rsync's copy differs"), "{error}");
        let err = checks
            .verdict()
            .expect_err("a failed check fails the run")
            .to_string();
        assert!(err.contains("rsync"), "{err}");
        assert!(!err.contains("tcp copy"), "{err}");
    }

    #[test]
    fn an_unavailable_peer_is_not_a_failure_and_names_its_package() {
        let mut checks = Checks::default();
        let why = tool("surely-not-a-real-tool-xyz", "some-package").expect_err("not on PATH");
        assert!(why.contains("apt-get install some-package"), "{why}");
        checks.unavailable("borg", &why);
        assert!(checks.verdict().is_ok());
        assert_eq!(checks.json()[0]["status"], "unavailable");
    }
}
