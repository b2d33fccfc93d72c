//! Hook writers: executables in the node's `hooks.d/`.
//!
//! To the coordinator the whole folder is one writer named `hooks.d`. On
//! `freeze` its scripts run one after another in lexical order with the
//! argument `freeze`; on `thaw` and `abort` in reverse order with `thaw` or
//! `abort`; on `post_snapshot` in lexical order with `post-snapshot` and the
//! image path as second argument. No shell is involved. A script that exits
//! non-zero, cannot start, or runs past the hook timeout is a veto naming the
//! script; on freeze the scripts that already froze are thawed again (reverse
//! order) before the veto is reported, so nothing stays frozen.
//!
//! A script that is not trusted (owned by someone other than root or the daemon's
//! user, or writable by group/others, or in such a directory; see
//! [`super::hook_trust`]) is not run: that is a veto naming it.
//!
//! Each script also gets `FREEZEFRAME_SNAPSHOT`, `FREEZEFRAME_NODE` and
//! `FREEZEFRAME_EVENT` in its environment.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use freezeframe_core::protocol::EventKind as EventName;
use tokio::process::Command;

/// The executables of a hooks folder in lexical order (non-executables and
/// hidden files are skipped, so a README may sit beside them).
pub fn scripts(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            v.push(entry.path());
        }
    }
    v.sort();
    Ok(v)
}

/// The context every script of one event runs with.
#[derive(Debug, Clone)]
pub struct HookRun {
    pub node: String,
    pub snapshot: u64,
    pub timeout: Duration,
    pub image_path: Option<String>,
}

/// Runs the folder for one event. `Err` is the veto reason.
pub async fn run_event(dir: &Path, event: EventName, run: &HookRun) -> Result<(), String> {
    let all = scripts(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    match event {
        EventName::Freeze => {
            for (i, s) in all.iter().enumerate() {
                if let Err(reason) = run_one(s, "freeze", run).await {
                    // Thaw what already froze, newest first, then veto.
                    for done in all[..i].iter().rev() {
                        if let Err(e) = run_one(done, "thaw", run).await {
                            tracing::warn!(script = %done.display(), "thaw after failed freeze: {e}");
                        }
                    }
                    return Err(reason);
                }
            }
            Ok(())
        }
        EventName::PostSnapshot => {
            for s in &all {
                run_one(s, "post-snapshot", run).await?;
            }
            Ok(())
        }
        EventName::Thaw | EventName::Abort => {
            // Thaw every script even if one fails, so no application stays frozen.
            let arg = if event == EventName::Thaw {
                "thaw"
            } else {
                "abort"
            };
            let mut first_err = None;
            for s in all.iter().rev() {
                if let Err(e) = run_one(s, arg, run).await {
                    tracing::warn!(script = %s.display(), "{e}");
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        }
    }
}

async fn run_one(script: &Path, arg: &str, run: &HookRun) -> Result<(), String> {
    super::hook_trust::check_trusted(script)?;
    let mut cmd = Command::new(script);
    cmd.arg(arg)
        .env("FREEZEFRAME_SNAPSHOT", run.snapshot.to_string())
        .env("FREEZEFRAME_NODE", &run.node)
        .env("FREEZEFRAME_EVENT", arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(p) = &run.image_path {
        cmd.arg(p);
    }
    let name = script.display();
    let child = cmd
        .spawn()
        .map_err(|e| format!("hook {name} could not start: {e}"))?;
    match tokio::time::timeout(run.timeout, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "hook {name} {arg} did not finish within {} ms",
            run.timeout.as_millis()
        )),
        Ok(Err(e)) => Err(format!("hook {name} {arg}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            Err(format!(
                "hook {name} {arg} exited with {}{}",
                out.status,
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(f, "#!/bin/sh\n{body}").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn run() -> HookRun {
        HookRun {
            node: "n1".into(),
            snapshot: 4,
            timeout: Duration::from_secs(5),
            image_path: None,
        }
    }

    #[tokio::test]
    async fn freeze_runs_in_lexical_order_and_thaw_in_reverse() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let hooks = d.path().join("hooks.d");
        std::fs::create_dir(&hooks).unwrap();
        for n in ["20-b", "10-a", "30-c"] {
            script(
                &hooks,
                n,
                &format!("echo {n} $1 $FREEZEFRAME_SNAPSHOT >> {}", log.display()),
            );
        }
        std::fs::write(hooks.join("README"), "not executable").unwrap();
        run_event(&hooks, EventName::Freeze, &run()).await.unwrap();
        run_event(&hooks, EventName::Thaw, &run()).await.unwrap();
        let got = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            got,
            "10-a freeze 4\n20-b freeze 4\n30-c freeze 4\n30-c thaw 4\n20-b thaw 4\n10-a thaw 4\n"
        );
    }

    #[tokio::test]
    async fn failing_freeze_hook_vetoes_and_thaws_the_ones_before_it() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let hooks = d.path().join("hooks.d");
        std::fs::create_dir(&hooks).unwrap();
        script(&hooks, "10-db", &format!("echo db $1 >> {}", log.display()));
        script(&hooks, "20-bad", "echo cannot flush >&2; exit 1");
        script(
            &hooks,
            "30-never",
            &format!("echo never $1 >> {}", log.display()),
        );
        let err = run_event(&hooks, EventName::Freeze, &run())
            .await
            .unwrap_err();
        assert!(
            err.contains("20-bad") && err.contains("cannot flush"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "db freeze\ndb thaw\n"
        );
    }

    #[tokio::test]
    async fn a_hook_that_hangs_is_a_veto_after_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "10-hang", "sleep 30");
        let mut r = run();
        r.timeout = Duration::from_millis(200);
        let err = run_event(d.path(), EventName::Freeze, &r)
            .await
            .unwrap_err();
        assert!(err.contains("did not finish within 200 ms"), "{err}");
    }
}
