//! Long operations (verify, backup) as child processes of the `freezeframe`
//! program, as `docs/protocol.md` ("Long operations from the console") says:
//! `--progress` lines on stderr become [`Update::JobProgress`], the JSON on
//! stdout becomes the summary, and cancelling kills the child (the operations
//! are crash-safe, so nothing half-made is left).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::backend::UpdateSink;
use crate::model::{JobKind, Update};
use crate::wire;

/// A started job; cancel it or ask whether it ended.
#[derive(Debug)]
pub struct Running {
    cancel: Option<tokio::sync::oneshot::Sender<()>>,
    finished: Arc<AtomicBool>,
}

impl Running {
    pub fn cancel(mut self) {
        if let Some(c) = self.cancel.take() {
            let _ = c.send(());
        }
    }

    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// The command line of a job, without the program.
pub fn args(kind: JobKind, id: u64, repo: Option<&Path>) -> Vec<String> {
    let id = id.to_string();
    match kind {
        JobKind::Verify => vec![
            "snapshot".into(),
            "verify".into(),
            id,
            "--json".into(),
            "--progress".into(),
        ],
        JobKind::Backup => {
            let repo = repo.map(|r| r.display().to_string()).unwrap_or_default();
            vec![
                "backup".into(),
                "run".into(),
                "--repo".into(),
                repo,
                "--snapshot".into(),
                id,
                "--json".into(),
                "--progress".into(),
            ]
        }
    }
}

/// Starts the child on the current tokio runtime and reports through `sink`.
pub fn spawn(
    exe: &Path,
    kind: JobKind,
    id: u64,
    repo: Option<PathBuf>,
    sink: UpdateSink,
) -> Running {
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel();
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args(kind, id, repo.as_deref()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let exe = exe.to_path_buf();
    tokio::spawn(async move {
        sink.send(Update::JobStarted { kind, id });
        let outcome = run_child(cmd, &exe, kind, id, repo.as_deref(), &sink, cancel_rx).await;
        done.store(true, Ordering::Release);
        sink.send(Update::JobFinished { kind, id, outcome });
    });
    Running {
        cancel: Some(cancel_tx),
        finished,
    }
}

async fn run_child(
    mut cmd: tokio::process::Command,
    exe: &Path,
    kind: JobKind,
    id: u64,
    repo: Option<&Path>,
    sink: &UpdateSink,
    cancel: tokio::sync::oneshot::Receiver<()>,
) -> Result<String, String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let (Some(stderr), Some(mut stdout)) = (child.stderr.take(), child.stdout.take()) else {
        return Err("the child's output pipes are missing".into());
    };
    let progress_sink = sink.clone();
    // The last line that was not progress: the child's error message if it fails.
    let stderr_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut last = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            match wire::parse_progress(&line) {
                Some(p) => {
                    progress_sink.send(Update::JobProgress(p));
                }
                None if !line.trim().is_empty() => {
                    tracing::info!("job: {line}");
                    last = line;
                }
                None => {}
            }
        }
        last
    });
    let stdout_task = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    });
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| format!("waiting for {}: {e}", exe.display()))?,
        _ = cancel => {
            let _ = child.kill().await;
            return Err("cancelled".into());
        }
    };
    let last_err = stderr_task.await.unwrap_or_default();
    let out = stdout_task.await.unwrap_or_default();
    if !status.success() {
        let why = last_err.trim().trim_start_matches("error: ").to_string();
        return Err(if why.is_empty() {
            format!("{} exited with {status}", exe.display())
        } else {
            why
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| format!("{} printed a result that is not JSON: {e}", exe.display()))?;
    Ok(summary(kind, id, repo, &v))
}

/// One sentence for the notice line.
pub fn summary(kind: JobKind, id: u64, repo: Option<&Path>, v: &serde_json::Value) -> String {
    match kind {
        JobKind::Verify => {
            let hash = v.get("blake3").and_then(|h| h.as_str()).unwrap_or("?");
            let short = hash.get(..16).unwrap_or(hash);
            match v.get("bytes").and_then(|b| b.as_u64()) {
                Some(b) => format!(
                    "Snapshot {id} verified: blake3 {short}… over {}",
                    crate::format::bytes(b)
                ),
                None => format!("Snapshot {id} verified: blake3 {short}…"),
            }
        }
        JobKind::Backup => {
            let to = repo.map(|r| r.display().to_string()).unwrap_or_default();
            format!("Snapshot {id} backed up to {to}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendHandle;
    use std::time::{Duration, Instant};

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("freezeframe");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn until_finished(fake: &crate::backend::FakeBackend, handle: &BackendHandle) -> Vec<Update> {
        let _ = fake;
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match handle.try_recv() {
                Some(u) => {
                    let end = matches!(u, Update::JobFinished { .. });
                    seen.push(u);
                    if end {
                        return seen;
                    }
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        panic!("job did not finish: {seen:?}");
    }

    fn tempdir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ff-gui-jobs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn verify_reports_progress_then_the_hash() {
        let dir = tempdir("verify");
        let exe = script(
            &dir,
            r#"echo '{"progress":{"done":1,"total":2,"unit":"bytes"}}' >&2
echo 'some log line' >&2
echo '{"progress":{"done":2,"total":2,"unit":"bytes"}}' >&2
echo '{"id":7,"blake3":"00112233445566778899aabbccddeeff","bytes":2048}'"#,
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (handle, fake) = BackendHandle::fake();
        let _job = rt.block_on(async { spawn(&exe, JobKind::Verify, 7, None, fake.sink.clone()) });
        let seen = until_finished(&fake, &handle);
        assert!(
            seen.contains(&Update::JobProgress(wire::Progress { done: 1, total: 2 })),
            "{seen:?}"
        );
        let Some(Update::JobFinished {
            outcome: Ok(text), ..
        }) = seen.last()
        else {
            panic!("{seen:?}")
        };
        assert_eq!(
            text,
            "Snapshot 7 verified: blake3 0011223344556677… over 2.0 KiB"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_failing_child_reports_its_error_line() {
        let dir = tempdir("fail");
        let exe = script(
            &dir,
            "echo 'error: snapshot 7 does not exist on n1' >&2\nexit 1",
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (handle, fake) = BackendHandle::fake();
        let _job = rt.block_on(async { spawn(&exe, JobKind::Verify, 7, None, fake.sink.clone()) });
        let seen = until_finished(&fake, &handle);
        let Some(Update::JobFinished {
            outcome: Err(why), ..
        }) = seen.last()
        else {
            panic!("{seen:?}")
        };
        assert_eq!(why, "snapshot 7 does not exist on n1");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn cancel_kills_the_child_and_says_cancelled() {
        let dir = tempdir("cancel");
        let exe = script(
            &dir,
            "echo '{\"progress\":{\"done\":0,\"total\":9}}' >&2\nexec sleep 30",
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (handle, fake) = BackendHandle::fake();
        let started = Instant::now();
        let job = rt.block_on(async {
            spawn(
                &exe,
                JobKind::Backup,
                3,
                Some(PathBuf::from("/r")),
                fake.sink.clone(),
            )
        });
        // Wait for the first progress line so the child is surely running.
        while !matches!(handle.try_recv(), Some(Update::JobProgress(_))) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no progress from the child"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        job.cancel();
        let seen = until_finished(&fake, &handle);
        let Some(Update::JobFinished {
            outcome: Err(why), ..
        }) = seen.last()
        else {
            panic!("{seen:?}")
        };
        assert_eq!(why, "cancelled");
        assert!(started.elapsed() < Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn backup_command_line_follows_the_protocol_doc() {
        assert_eq!(
            args(JobKind::Backup, 7, Some(Path::new("/backups/repo"))).join(" "),
            "backup run --repo /backups/repo --snapshot 7 --json --progress"
        );
        assert_eq!(
            args(JobKind::Verify, 7, None).join(" "),
            "snapshot verify 7 --json --progress"
        );
    }
}
